"""The emulator's settable clock.

Default is real UTC time. The admin API sets an absolute time or advances it; both are stored
as an offset from the wall clock (persisted), so time keeps flowing and a restart keeps it.
Business rules (hours, the 6- and 24-hour windows, billing, key and registration-token
expiry) read this clock. Transport-level checks against the *caller's* clock (web-identity
token expiry, credential expiry) use the wall clock, because callers sign with real time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from metering_operator.emulator.state import State

_KEY = "clock_offset_seconds"
# Python's datetime cannot go past year 9999, and every window and hour computed from the clock
# must stay representable: an admin call that would move the clock outside these bounds is
# refused instead of breaking every later request.
EARLIEST = datetime(1970, 1, 2, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)


class SettableClock:
    def __init__(self, state: State) -> None:
        self._state = state
        self._offset = float(state.get_kv(_KEY, 0.0))

    def timestamp(self) -> float:
        return time.time() + self._offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp(), UTC)

    @property
    def offset(self) -> float:
        return self._offset

    def _store(self, offset: float) -> None:
        now = time.time() + offset
        if not EARLIEST.timestamp() <= now <= LATEST.timestamp():  # also refuses NaN
            raise ValueError(
                f"the emulator clock must stay between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d} (UTC)"
            )
        self._offset = offset
        self._state.set_kv(_KEY, offset)

    def set(self, when: datetime) -> None:
        if when.tzinfo is None:
            raise ValueError("time must carry a time zone")
        self._store(when.timestamp() - time.time())

    def advance(self, seconds: float) -> None:
        self._store(self._offset + seconds)

    def reset(self) -> None:
        self._store(0.0)
