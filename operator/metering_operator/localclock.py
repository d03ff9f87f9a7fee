"""The operator's local wall clock, with a test hook to make it run fast or jump.

Test hook (documented, for clock tests only, like ``MMO_CRASH_AT``): ``MMO_CLOCK_SKEW_FILE`` =
a path whose content is a number of seconds added to this process's wall clock, re-read when the
file changes. It makes one replica's clock run 20 s fast, or jump a day ahead, without touching
the machine's clock. Every reader of wall time in the operator (metering, the Lease's
``renewTime``) goes through :func:`local_clock`, so the hook moves all of them at once.
"""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

from metering_operator.domain.clock import Clock, SystemClock

SKEW_ENV = "MMO_CLOCK_SKEW_FILE"


class SkewedClock:
    """The wall clock plus the number of seconds in ``path`` (0 while it is absent or unreadable)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: float | None = None
        self._skew = timedelta(0)

    def skew(self) -> timedelta:
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return timedelta(0)
        with self._lock:
            if stamp != self._stamp:
                try:
                    self._skew = timedelta(seconds=float(self.path.read_text().strip() or 0))
                except (OSError, ValueError):
                    self._skew = timedelta(0)
                self._stamp = stamp
            return self._skew

    def now(self) -> datetime:
        return datetime.now(UTC) + self.skew()


def local_clock() -> Clock:
    path = os.environ.get(SKEW_ENV)
    return SkewedClock(Path(path)) if path else SystemClock()
