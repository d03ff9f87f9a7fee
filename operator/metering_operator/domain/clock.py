"""Injected time.

All hour logic takes a :class:`Clock` so tests (and the demo, against the emulator's settable
clock) can move through hours in seconds. Times are always timezone-aware UTC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
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


class ReferenceClock:
    """Time as another party last told it, moved on by the local *monotonic* clock.

    Fed with observations (the API server's ``Date`` header, the emulator's clock): ``now`` is
    the last observed time plus the monotonic time elapsed since it was observed, so a jump of
    the local wall clock cannot move it. None until the first observation.
    """

    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._seen: tuple[datetime, float] | None = None

    def observe(self, when: datetime, at: float | None = None) -> None:
        """Record that the reference said ``when`` at monotonic time ``at`` (default: now)."""
        when = ensure_utc(when)
        with self._lock:
            self._seen = (when, self._monotonic() if at is None else at)

    def now(self) -> datetime | None:
        with self._lock:
            seen = self._seen
        if seen is None:
            return None
        when, at = seen
        return when + timedelta(seconds=max(self._monotonic() - at, 0.0))


class BoundedClock:
    """The local clock, trusted only while it agrees with a reference clock.

    The metering ledger closes hours by this clock, so a local clock that jumps forward a day
    would close a day of hours at the last value (and AWS would refuse them). While the local
    clock is within ``tolerance`` of the reference (the API server's clock, whose ``Date`` has
    one-second resolution) it is used as is; beyond that the reference is used instead and
    :attr:`skew` says by how much the local clock is off. Without an observation yet the local
    clock is used: nothing meters before the first Lease read, which is such an observation.
    """

    def __init__(self, local: Clock, reference: ReferenceClock, tolerance: timedelta) -> None:
        self.local = local
        self.reference = reference
        self.tolerance = tolerance
        self.skew: timedelta = timedelta(0)
        self.bounded = False

    def now(self) -> datetime:
        local = self.local.now()
        reference = self.reference.now()
        if reference is None:
            return local
        self.skew = local - reference
        self.bounded = abs(self.skew) > self.tolerance
        return reference if self.bounded else local


def ensure_utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"naive datetime {when!r}: times must be timezone-aware UTC")
    return when.astimezone(UTC)


def hour_start(when: datetime) -> datetime:
    """The start of the UTC hour containing ``when``."""
    return ensure_utc(when).replace(minute=0, second=0, microsecond=0)
