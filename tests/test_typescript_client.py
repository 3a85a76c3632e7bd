"""The TypeScript client (client/typescript): runs its `npm test` (typecheck, the generated event
types against the gateway's AsyncAPI document, app/static/sigmax.js against a fresh build, and
the node:test suite against real gateway processes) and reports npm's output when it fails.

Without node and npm the test is skipped with the reason; with SIGMAX_REQUIRE_SERVICES=1 (set
by CI) it fails instead.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

from tests.helpers import REDIS_URL, REPOSITORY, REQUIRE_SERVICES, install_npm_packages

PACKAGE = REPOSITORY / "client" / "typescript"
# The global WebSocket behind --experimental-websocket appeared in Node 20.10.
NODE_MINIMUM = (20, 10)


def missing(what: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"{what}, and SIGMAX_REQUIRE_SERVICES=1 requires it")
    pytest.skip(what)


def node_version(node: str) -> tuple[int, ...]:
    printed = subprocess.run(
        [node, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.match(r"v(\d+)\.(\d+)", printed.strip())
    return (int(match[1]), int(match[2])) if match else (0, 0)


@pytest.mark.timeout(900)
def test_typescript_client() -> None:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        missing("node and npm are needed for the TypeScript client's tests (Node 20.10 or newer)")
    if node_version(node) < NODE_MINIMUM:
        missing(f"the TypeScript client's tests need Node 20.10 or newer, not {node_version(node)}")
    install_npm_packages(npm, PACKAGE)
    env = {**os.environ, "SIGMAX_PYTHON": sys.executable, "SIGMAX_TEST_REDIS_URL": REDIS_URL}
    done = subprocess.run(
        [npm, "test"],
        cwd=PACKAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, (
        f"`npm test` in client/typescript failed:\n{done.stdout[-16000:]}\n{done.stderr[-4000:]}"
    )
    # node:test's spec reporter marks a skipped test with "﹣ name # reason": say it here too.
    for line in done.stdout.splitlines():
        if line.lstrip().startswith("\ufe63"):
            warnings.warn(f"skipped in client/typescript: {line.strip()[1:].strip()}", stacklevel=1)
