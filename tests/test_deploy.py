"""The deployment files that cannot run here (no systemd as init, no Docker daemon), checked as
files: the systemd unit's hardening by `systemd-analyze security --offline`, and the image's
user."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.helpers import REPOSITORY

UNIT = REPOSITORY / "deploy" / "systemd" / "sigmax-gateway.service"


def test_the_systemd_unit_is_hardened_and_migrates_nothing():
    """`systemd-analyze security` rated it 9.2 UNSAFE; it must stay at 2.0 or below. Migrations
    are run once per deployment, not by every host at every start."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    exposure = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert exposure is not None, done.stdout + done.stderr
    assert float(exposure[1]) <= 2.0, done.stdout
    unit = UNIT.read_text()
    assert "migrate" not in "".join(line for line in unit.splitlines() if line.startswith("Exec"))
    assert "User=sigmax" in unit


def test_the_image_runs_as_a_user_of_its_own():
    dockerfile = (REPOSITORY / "Dockerfile").read_text()
    final_stage = dockerfile.rsplit("\nFROM ", 1)[-1]
    users = re.findall(r"^USER\s+(\S+)", final_stage, re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), users
