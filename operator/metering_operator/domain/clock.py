"""Injected time.

All hour logic takes a :class:`Clock` so tests (and the demo, against the emulator's settable
clock) can move through hours in seconds. Times are always timezone-aware UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to; for tests."""

    def __init__(self, start: datetime) -> None:
        self._now = ensure_utc(start)

    def now(self) -> datetime:
        return self._now

    def set(self, when: datetime) -> None:
        self._now = ensure_utc(when)

    def advance(self, delta: timedelta) -> None:
        self._now += delta


class OffsetClock:
    """System time shifted by an offset that can be changed at run time.

    The operator uses it against the emulator's settable clock: the offset is refreshed from the
    emulator's admin API, so both agree on which hour it is.
    """

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset


def ensure_utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: times must be timezone-aware UTC")
    return when.astimezone(UTC)


def hour_start(when: datetime) -> datetime:
    """The start of the UTC hour containing ``when``."""
    return ensure_utc(when).replace(minute=0, second=0, microsecond=0)
