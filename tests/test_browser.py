"""The dashboard end to end in headless Chromium: runs the node:test suite in tests/e2e (real
gateway processes, Redis, a browser driven by playwright-core) and reports its output.

Without node, /usr/bin/chromium (`make browser`) or Redis the test is skipped with the reason;
with SIGMAX_REQUIRE_SERVICES=1 (set by CI) it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.helpers import REDIS_URL, REPOSITORY, REQUIRE_SERVICES, install_npm_packages

E2E = REPOSITORY / "tests" / "e2e"
CHROMIUM = os.environ.get("SIGMAX_CHROMIUM", "/usr/bin/chromium")


def missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what}, and SIGMAX_REQUIRE_SERVICES=1 requires it")
    pytest.skip(what)


def redis_error() -> str | None:
    import redis
    from redis.exceptions import RedisError

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except (RedisError, OSError) as error:
        return str(error)
    finally:
        client.close()
    return None


@pytest.mark.timeout(600)
def test_dashboard_in_headless_chromium() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node and npm are needed for the browser test (Node 20 or newer)")
    if not os.access(CHROMIUM, os.X_OK):
        missing(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    error = redis_error()
    if error is not None:
        missing(f"Redis is not reachable at {REDIS_URL} ({error})")
    install_npm_packages(npm, E2E)
    env = {
        **os.environ,
        "SIGMAX_PYTHON": sys.executable,
        "SIGMAX_CHROMIUM": CHROMIUM,
        "SIGMAX_TEST_REDIS_URL": REDIS_URL,
    }
    done = subprocess.run(
        [node, "--test"], cwd=E2E, env=env, capture_output=True, text=True, timeout=540, check=False
    )
    assert done.returncode == 0, (
        f"the browser test failed (screenshots in "
        f"{E2E / 'artifacts'}):\n{done.stdout[-12000:]}\n"
        f"{done.stderr[-4000:]}"
    )
