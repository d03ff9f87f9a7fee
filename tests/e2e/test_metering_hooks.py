"""The crash-injection test hook of the metering handler, exercised in real child processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (
    "from metering_operator.metering.hooks import crash_point\n"
    "crash_point('after-ledger-write')\n"
    "crash_point('after-call')\n"
    "print('survived')\n"
)


def run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator"), **env}
    for var in ("MMO_CRASH_AT", "MMO_CRASH_MARKER"):
        if var not in env:
            full.pop(var, None)
    return subprocess.run(
        [sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=60
    )


def test_no_hook_no_crash() -> None:
    result = run({})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "survived"


def test_hook_kills_with_sigkill_at_the_named_step() -> None:
    result = run({"MMO_CRASH_AT": "after-call"})
    assert result.returncode == -signal.SIGKILL
    assert "survived" not in result.stdout


@pytest.mark.parametrize("step", ["before-ledger-write", "bogus"])
def test_other_steps_do_not_fire(step: str) -> None:
    assert run({"MMO_CRASH_AT": step}).returncode == 0


def test_marker_makes_it_fire_once(tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    first = run({"MMO_CRASH_AT": "after-call", "MMO_CRASH_MARKER": str(marker)})
    assert first.returncode == -signal.SIGKILL
    assert marker.read_text() == "after-call"
    second = run({"MMO_CRASH_AT": "after-call", "MMO_CRASH_MARKER": str(marker)})
    assert second.returncode == 0
    assert second.stdout.strip() == "survived"
