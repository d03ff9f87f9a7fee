"""Hourly metering: kopf glue around :mod:`metering_operator.metering`.

Each product with dimensions -- or with ledger entries still to send after its dimensions were
removed -- has a :class:`MeteringJob` on the process's one scheduler
(:mod:`metering_operator.gate.scheduler`, the thread that also steps the gate's products): every
sampling interval, when the job's timer comes due, the scheduler hands one blocking cycle
(:func:`metering_operator.metering.cycle.run_cycle`) to the bounded cycle pool, so the sync
Kubernetes client and boto3 never touch kopf's event loop or the scheduler's thread, and the next
cycle is timed from the end of the last: never two cycles of one product at once. The async kopf
daemon only adds the job and, when the product is deleted or stops metering, removes it, waits
for a cycle in flight to end and then releases the product's state. The shared runtime is built
by ``metering-operator run`` and reaches the handlers as ``memo.metering_runtime``, the scheduler
as ``memo.scheduler``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Any

import kopf

from metering_operator.domain.product import GROUP, PLURAL, VERSION
from metering_operator.gate.scheduler import Scheduler
from metering_operator.metering.cycle import run_cycle
from metering_operator.metering.plan import has_live_entries
from metering_operator.metering.runtime import MeteringRuntime
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 60.0


def _meters(
    spec: Mapping[str, Any], status: Mapping[str, Any], namespace: str | None, name: str, memo: Any, **_: Any
) -> bool:
    """Whether the product meters: its effective spec has dimensions (a pinned product keeps its
    pinned dimensions when the buyer removes them), or its ledger still has entries to send."""
    if (spec.get("metering") or {}).get("dimensions") or has_live_entries(status):
        return True
    settings: OperatorSettings | None = getattr(memo, "settings", None)
    pin = settings.pins.at(namespace or "", name) if settings is not None else None
    return pin is not None and bool(pin.dimensions)


def interval_for(settings: OperatorSettings, spec: Mapping[str, Any]) -> float:
    if settings.sample_interval_seconds:
        return float(settings.sample_interval_seconds)
    return float((spec.get("metering") or {}).get("sampleIntervalSeconds") or DEFAULT_INTERVAL)


#: The job's timer key, and the message its cycle posts when it has ended.
CYCLE = "cycle"
CYCLE_DONE = "cycle-done"


class MeteringJob:
    """One product's sampling cycles, stepped by the scheduler (its thread only, but
    :meth:`_cycle`, which runs in the cycle pool)."""

    def __init__(
        self,
        rt: MeteringRuntime,
        scheduler: Scheduler,
        namespace: str,
        name: str,
        interval: Callable[[], float],
        first: float,
    ) -> None:
        self.rt = rt
        self.sched = scheduler
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self.first = first
        #: The cycle in the pool, if any (the daemon waits for it before releasing the product).
        self.running: Future[None] | None = None

    def __repr__(self) -> str:
        return f"metering job of {self.namespace}/{self.name}"

    def started(self) -> None:
        self.sched.after(self, self.first, CYCLE)

    def due(self, key: Hashable) -> None:
        if self.running is None:  # CYCLE, or RECOVER after a failure here
            self.running = self.rt.cycle_pool.submit(self._cycle)

    def receive(self, message: Any) -> None:
        if message == CYCLE_DONE:
            self.running = None
            self.sched.after(self, self.interval(), CYCLE)

    def stopped(self) -> None:
        """Removed: no cycle is started any more (one in flight ends on its own)."""

    def _cycle(self) -> None:
        try:
            run_cycle(self.rt, self.namespace, self.name)
        except Exception:
            log.exception("%s/%s: metering cycle failed; retrying next interval", self.namespace, self.name)
        finally:
            self.sched.post(self, CYCLE_DONE)


@kopf.daemon(GROUP, VERSION, PLURAL, id="metering", when=_meters, cancellation_timeout=10.0)
async def meter_product(
    *, name: str, namespace: str | None, spec: Any, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    namespace = namespace or "default"
    rt: MeteringRuntime = memo.metering_runtime
    scheduler: Scheduler = memo.scheduler
    job = MeteringJob(
        rt,
        scheduler,
        namespace,
        name,
        interval=lambda: interval_for(rt.settings, spec),  # kopf's live spec: a change applies next
        # Spread products over the interval so 50 of them do not sample in the same instant.
        first=random.uniform(0, min(interval_for(rt.settings, spec), 5.0)),
    )
    try:
        await asyncio.wrap_future(scheduler.add(job))
        await stopped.wait()
    finally:
        try:
            await asyncio.wrap_future(scheduler.remove(job))
            if job.running is not None:
                await asyncio.wrap_future(job.running)  # a cycle in flight ends before the release
        finally:
            # Deleted, or nothing to meter any more: its watches must not outlive it.
            await asyncio.to_thread(rt.release, namespace, name)


@kopf.on.cleanup()
async def _release_lease(memo: Any, **_: Any) -> None:
    rt: MeteringRuntime | None = getattr(memo, "metering_runtime", None)
    if rt is not None:
        await asyncio.to_thread(rt.stop)
