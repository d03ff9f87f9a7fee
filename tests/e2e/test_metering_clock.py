"""The operator's clock follows a real emulator process's settable clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from metering_operator.emulator_clock import EmulatorClock, clock_url
from tests.emulator.harness import start_emulator


def test_clock_url_accepts_base_admin_and_endpoint() -> None:
    assert clock_url("http://h:1") == "http://h:1/_emulator/clock"
    assert clock_url("http://h:1/_emulator/") == "http://h:1/_emulator/clock"
    assert clock_url("http://h:1/_emulator/clock") == "http://h:1/_emulator/clock"


def test_follows_set_and_advance_and_keeps_flowing(tmp_path: Path) -> None:
    emulator = start_emulator(None, tmp_path / "state")
    try:
        target = datetime(2031, 1, 2, 3, 0, tzinfo=UTC)
        emulator.admin.set_clock(target)
        clock = EmulatorClock(emulator.url, interval=0.1)
        try:
            assert abs(clock.now() - target) < timedelta(seconds=2)
            emulator.admin.advance_clock(3600)
            deadline = time.monotonic() + 5
            while clock.now() < target + timedelta(hours=1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert target + timedelta(hours=1) <= clock.now() < target + timedelta(hours=1, seconds=5)
            # between refreshes time still moves, at the speed of the system clock
            first = clock.now()
            time.sleep(0.2)
            assert clock.now() > first
        finally:
            clock.stop()
    finally:
        emulator.stop()


def test_an_unreachable_emulator_is_a_clear_error() -> None:
    with pytest.raises(OSError, match="refused"):
        EmulatorClock("http://127.0.0.1:9", start=False)
