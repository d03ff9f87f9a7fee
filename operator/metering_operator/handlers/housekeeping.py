"""kopf glue for the periodic sweep of deleted products' records (:mod:`metering_operator.kube.sweep`).

Every replica may sweep: a delete carries the record's uid and resourceVersion as preconditions,
so two sweeps, or a sweep racing a write, can only keep a record, never remove a live one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from metering_operator import metrics
from metering_operator.domain.clock import Clock, SystemClock
from metering_operator.kube.apiclient import new_api_client
from metering_operator.kube.sweep import RecordSweeper
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

_tasks: set[asyncio.Task[None]] = set()


async def _sweep_forever(sweeper: RecordSweeper, interval_seconds: float) -> None:
    while True:
        await asyncio.sleep(interval_seconds)
        try:
            for _name, kind in await asyncio.to_thread(sweeper.sweep):
                metrics.RECORDS_REMOVED.labels(kind=kind).inc()
            metrics.RECORD_SWEEPS.inc()
        except Exception:
            log.exception("sweeping deleted products' records failed; retrying in %.0f s", interval_seconds)


@kopf.on.startup()
async def start_record_sweep(memo: Any, **_: Any) -> None:
    settings: OperatorSettings = memo.settings
    if not settings.record_sweep_interval_seconds:
        return
    clock: Clock = getattr(memo, "clock", None) or SystemClock()
    sweeper = RecordSweeper(new_api_client(pool_size=2), settings.operator_namespace, clock)
    task = asyncio.create_task(_sweep_forever(sweeper, settings.record_sweep_interval_seconds))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


@kopf.on.cleanup()
async def stop_record_sweep(**_: Any) -> None:
    for task in list(_tasks):
        task.cancel()
