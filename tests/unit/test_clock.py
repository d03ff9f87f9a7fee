"""The operator's clock: local time held to a reference that a wall-clock jump cannot move."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from metering_operator.domain.clock import BoundedClock, ManualClock, ReferenceClock, hour_start
from metering_operator.localclock import SkewedClock

T0 = datetime(2031, 3, 4, 10, 59, 30, tzinfo=UTC)


class Ticks:
    """An injected monotonic clock."""

    def __init__(self) -> None:
        self.value = 1000.0

    def __call__(self) -> float:
        return self.value


def test_the_reference_moves_on_the_monotonic_clock_only() -> None:
    ticks = Ticks()
    reference = ReferenceClock(ticks)
    assert reference.now() is None
    reference.observe(T0)
    ticks.value += 90
    assert reference.now() == T0 + timedelta(seconds=90)


def test_a_local_clock_within_tolerance_is_used_and_a_jump_is_not() -> None:
    ticks = Ticks()
    local = ManualClock(T0 + timedelta(seconds=2))
    reference = ReferenceClock(ticks)
    clock = BoundedClock(local, reference, timedelta(seconds=30))
    assert clock.now() == local.now()  # no observation yet: nothing to judge by
    reference.observe(T0)
    assert clock.now() == T0 + timedelta(seconds=2)
    assert (clock.bounded, clock.skew) == (False, timedelta(seconds=2))
    # the local clock jumps a day ahead: the hour does not change
    local.advance(timedelta(hours=24))
    ticks.value += 10
    assert clock.now() == T0 + timedelta(seconds=10)
    assert hour_start(clock.now()) == hour_start(T0)
    assert clock.bounded
    assert clock.skew > timedelta(hours=23)


def test_the_skew_hook_follows_its_file(tmp_path: Path) -> None:
    path = tmp_path / "skew"
    clock = SkewedClock(path)
    assert abs(clock.now() - datetime.now(UTC)) < timedelta(seconds=1)  # no file: no skew
    path.write_text("86400")
    assert clock.now() - datetime.now(UTC) > timedelta(hours=23, minutes=59)
