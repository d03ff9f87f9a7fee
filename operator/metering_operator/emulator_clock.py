"""A Clock that follows the emulator's settable clock (tests and the demo only).

The emulator's admin API (``GET /_emulator/clock`` -> ``{"now": "<ISO 8601>", "offsetSeconds":
<float>}``) says what time "AWS" thinks it is; tests move it by hours in one call. The operator
must agree, or it would close hours the emulator considers open and send timestamps the emulator
refuses. The emulator keeps its time as the wall clock plus a configured offset, so this clock
is the local wall clock plus that same offset (time keeps flowing between refreshes), re-read
every ``interval`` seconds in a daemon thread, and on demand with :meth:`EmulatorClock.refresh`.

Each refresh also feeds :attr:`EmulatorClock.reference` with the emulator's own "now": in tests
it plays the part the API server's ``Date`` plays in a cluster, bounding the local clock
(:class:`~metering_operator.domain.clock.BoundedClock`), so a local clock jump can be tested.

Never used against real AWS: the operator only builds it when ``--emulator-clock-url`` is given.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.request
from datetime import datetime, timedelta

from metering_operator.domain.clock import Clock, ReferenceClock, SystemClock, ensure_utc

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


def read_emulator_clock(url: str, timeout: float = 5.0) -> tuple[datetime, timedelta]:
    """The emulator's current time and its offset from the wall clock."""
    with urllib.request.urlopen(clock_url(url), timeout=timeout) as response:
        body = json.loads(response.read())
    try:
        now = ensure_utc(datetime.fromisoformat(str(body["now"]).replace("Z", "+00:00")))
        return now, timedelta(seconds=float(body.get("offsetSeconds") or 0.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"unexpected emulator clock answer {body!r}") from exc


def read_emulator_time(url: str, timeout: float = 5.0) -> datetime:
    """The emulator's current time; raises ``ValueError`` on an answer without a zoned ``now``."""
    return read_emulator_clock(url, timeout)[0]


class EmulatorClock:
    """The local wall clock plus the emulator's offset, refreshed in the background."""

    def __init__(
        self, url: str, interval: float = 1.0, start: bool = True, wall: Clock | None = None
    ) -> None:
        self.url = clock_url(url)
        self.interval = interval
        self.wall: Clock = wall or SystemClock()
        self.offset = timedelta(0)
        self.reference = ReferenceClock()
        self._stop = threading.Event()
        self.refresh()
        if start:
            threading.Thread(target=self._follow, name="emulator-clock", daemon=True).start()

    def now(self) -> datetime:
        return self.wall.now() + self.offset

    def refresh(self) -> None:
        emulator_now, offset = read_emulator_clock(self.url)
        self.reference.observe(emulator_now)
        self.offset = offset

    def stop(self) -> None:
        self._stop.set()

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except (OSError, ValueError) as exc:  # a hiccup must not stop time; keep the old offset
                log.warning("cannot read the emulator clock at %s: %s", self.url, exc)
