"""kopf glue for reporting MeteredProduct changes and the seller's pins (:mod:`metering_operator.pinning`).

One ``on.event`` handler sees every MeteredProduct event (and each object at start): it needs no
finalizer and no kopf diff-base annotation, which a buyer could edit to hide a change. The pinned
products' presence is checked at start, on each deletion (from the event) and every
:data:`~metering_operator.pinning.presence.CHECK_INTERVAL_SECONDS`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import kopf

from metering_operator import metrics
from metering_operator.domain.clock import Clock, SystemClock
from metering_operator.domain.product import GROUP, PLURAL, VERSION
from metering_operator.kube.apiclient import new_api_client
from metering_operator.kube.events import EventPoster
from metering_operator.pinning.presence import CHECK_INTERVAL_SECONDS, PinPresence
from metering_operator.pinning.reporter import SpecReporter
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass
class PinsRuntime:
    reporter: SpecReporter
    presence: PinPresence


_lock = threading.Lock()
_runtime: PinsRuntime | None = None


def runtime(memo: Any) -> PinsRuntime:
    global _runtime
    with _lock:
        if _runtime is None:
            settings: OperatorSettings = memo.settings
            clock: Clock = getattr(memo, "clock", None) or SystemClock()
            api = new_api_client(pool_size=4)
            events = EventPoster(api)
            presence = PinPresence(api, events, settings.pins)
            _runtime = PinsRuntime(SpecReporter(api, events, settings.pins, presence, clock), presence)
        return _runtime


_ACTED = metrics.PRODUCT_EVENTS.labels("spec-report", "acted")
_SKIPPED = metrics.PRODUCT_EVENTS.labels("spec-report", "skipped")


@kopf.on.event(GROUP, VERSION, PLURAL, id="spec-report")
async def report_spec(event: Any, body: Any, memo: Any, **_: Any) -> None:
    """Most events are status writes' echoes that change nothing the reporter reads: they are
    settled on the loop, cheaply. The others are observed in a worker thread (parsing, API calls),
    awaited, so kopf still hands this product's next event only after this one."""
    try:
        rt = _runtime if _runtime is not None else await asyncio.to_thread(runtime, memo)
        reporter = rt.reporter
        if reporter.settled(event.get("type"), body):
            _SKIPPED.inc()
            return
        _ACTED.inc()
        await asyncio.to_thread(reporter.observe, event.get("type"), body)
    except Exception:
        log.exception("reporting on MeteredProduct %s failed", (body.get("metadata") or {}).get("name"))


async def _check_pins_forever(presence: PinPresence) -> None:
    while True:
        try:
            await asyncio.to_thread(presence.check_all)
        except Exception:
            log.exception("checking the pinned MeteredProducts failed; retrying")
        await asyncio.sleep(CHECK_INTERVAL_SECONDS)


_tasks: set[asyncio.Task[None]] = set()


@kopf.on.startup()
async def start_pin_checks(memo: Any, **_: Any) -> None:
    settings: OperatorSettings = memo.settings
    if not settings.pins:
        return
    rt = await asyncio.to_thread(runtime, memo)
    for pin in settings.pins.pins:
        log.info(
            "pin: product code %s -> MeteredProduct %s (minimum %s, scope %s, %d dimension(s), key %s)",
            pin.product_code,
            pin.key,
            pin.min_mode.value,
            pin.scope.value,
            len(pin.dimensions),
            f"v{pin.public_key_version}" if pin.public_key_version else "not pinned",
        )
    task = asyncio.create_task(_check_pins_forever(rt.presence))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


@kopf.on.cleanup()
async def stop_pin_checks(**_: Any) -> None:
    for task in list(_tasks):
        task.cancel()
