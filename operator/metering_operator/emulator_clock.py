"""A Clock that follows the emulator's settable clock (tests and the demo only).

The emulator's admin API (``GET /_emulator/clock`` -> ``{"now": "<ISO 8601>"}``) says what time
"AWS" thinks it is; tests move it by hours in one call. The operator must agree, or it would
close hours the emulator considers open and send timestamps the emulator refuses. So this clock
is :class:`~metering_operator.domain.clock.OffsetClock` (system time plus an offset, so time
keeps flowing between refreshes) whose offset is re-read from the emulator every ``interval``
seconds in a daemon thread, and on demand with :meth:`EmulatorClock.refresh`.

Never used against real AWS: the operator only builds it when ``--emulator-clock-url`` is given.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from datetime import UTC, datetime

from metering_operator.domain.clock import OffsetClock, ensure_utc

log = logging.getLogger(__name__)
CLOCK_PATH = "/_emulator/clock"


def clock_url(url: str) -> str:
    """The clock endpoint for an emulator base URL, admin URL or the endpoint itself."""
    base = url.rstrip("/")
    if base.endswith(CLOCK_PATH):
        return base
    if base.endswith("/_emulator"):
        return base + "/clock"
    return base + CLOCK_PATH


def read_emulator_time(url: str, timeout: float = 5.0) -> datetime:
    """The emulator's current time; raises ``ValueError`` on an answer without a zoned ``now``."""
    with urllib.request.urlopen(clock_url(url), timeout=timeout) as response:
        body = json.loads(response.read())
    try:
        return ensure_utc(datetime.fromisoformat(str(body["now"]).replace("Z", "+00:00")))
    except (KeyError, TypeError) as exc:
        raise ValueError(f"unexpected emulator clock answer {body!r}") from exc


class EmulatorClock(OffsetClock):
    """System time plus the emulator's offset, refreshed in the background."""

    def __init__(self, url: str, interval: float = 1.0, start: bool = True) -> None:
        super().__init__()
        self.url = clock_url(url)
        self.interval = interval
        self._stop = threading.Event()
        self.refresh()
        if start:
            threading.Thread(target=self._follow, name="emulator-clock", daemon=True).start()

    def refresh(self) -> None:
        emulator_now = read_emulator_time(self.url)
        self.offset = emulator_now - datetime.now(UTC)

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except (OSError, ValueError) as exc:  # a hiccup must not stop time; keep the old offset
                log.warning("cannot read the emulator clock at %s: %s", self.url, exc)
