"""The shipped Prometheus files, checked by Prometheus' own promtool: the scrape configuration,
the alert rules, and their unit tests (deploy/prometheus/alerts.test.yml: each alert fires on the
series the gateway exports, and not on a healthy host)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import REPOSITORY, unavailable

PROMETHEUS = REPOSITORY / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        unavailable("promtool", FileNotFoundError("make promtool installs Debian's prometheus"))
    return str(found)


@pytest.mark.parametrize(
    "command",
    [
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ],
    ids=" ".join,
)
def test_promtool_passes(promtool, command):
    done = subprocess.run(
        [promtool, *command],
        cwd=PROMETHEUS,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
