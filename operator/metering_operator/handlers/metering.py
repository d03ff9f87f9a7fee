"""Hourly metering: kopf glue around :mod:`metering_operator.metering` (one daemon per product).

Each product with dimensions -- or with ledger entries still to send after its dimensions were
removed -- gets an async kopf daemon that, every sampling interval, runs one blocking cycle
(:func:`metering_operator.metering.cycle.run_cycle`) in a worker thread, so the sync Kubernetes
client and boto3 never touch kopf's event loop. The shared runtime is built by
``metering-operator run`` and reaches the handlers as ``memo.metering_runtime``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import kopf

from metering_operator.domain.product import GROUP, PLURAL, VERSION
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


@kopf.daemon(GROUP, VERSION, PLURAL, id="metering", when=_meters, cancellation_timeout=10.0)
async def meter_product(
    *, name: str, namespace: str | None, spec: Any, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    namespace = namespace or "default"
    rt: MeteringRuntime = memo.metering_runtime
    # Spread products over the interval so 50 of them do not sample in the same instant.
    await stopped.wait(random.uniform(0, min(interval_for(rt.settings, spec), 5.0)))
    try:
        while not stopped:
            try:
                await asyncio.to_thread(run_cycle, rt, namespace, name)
            except Exception:
                log.exception("%s/%s: metering cycle failed; retrying next interval", namespace, name)
            await stopped.wait(interval_for(rt.settings, spec))
    finally:
        # Deleted, or nothing to meter any more: its watches must not outlive it.
        await asyncio.to_thread(rt.release, namespace, name)


@kopf.on.cleanup()
async def _release_lease(memo: Any, **_: Any) -> None:
    rt: MeteringRuntime | None = getattr(memo, "metering_runtime", None)
    if rt is not None:
        await asyncio.to_thread(rt.stop)
