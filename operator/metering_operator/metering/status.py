"""The metering half of a MeteredProduct's status: ``status.metering`` and the Metering condition.

Written with a resourceVersion precondition (:class:`metering_operator.kube.status.StatusStore`):
the ledger is only safe if a write based on a stale read can never win. ``status.metering``
goes through the pydantic :class:`~metering_operator.domain.product.MeteringStatus` model; the
rest of the status (the gate's half) travels through unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from metering_operator.domain import ledger, onfailure
from metering_operator.domain.conditions import ConditionSpec, set_condition
from metering_operator.domain.product import MeteringStatus
from metering_operator.metering.plan import ProductPlan

REPAIRED = "StatusRepaired"


def metering_status(
    obj: Mapping[str, Any],
    plan: ProductPlan,
    metering: MeteringStatus,
    now: datetime,
    repaired: str | None = None,
) -> dict[str, Any]:
    """The object's whole status with ``metering`` and the Metering and MeteringHealthy conditions
    replaced.

    ``repaired`` (what was found edited or lost) makes the condition's reason StatusRepaired
    unless the ledger has something worse to say (a refused dimension, failing sends).
    """
    status = dict(obj.get("status") or {})
    status["metering"] = metering.to_kube()
    condition, reason, message = ledger.metering_condition(
        metering, [r.name for r in plan.rules], plan.dry_run
    )
    if repaired and condition == "True":
        reason, message = REPAIRED, f"status repaired: {repaired}; {message}"
    status["conditions"] = set_condition(
        status.get("conditions"),
        "Metering",
        condition,  # type: ignore[arg-type]
        reason,
        message,
        int(obj["metadata"].get("generation") or 0),
        now,
    )
    health = health_of(plan, metering)
    status["conditions"] = set_condition(
        status["conditions"],
        health.type,
        health.status,
        health.reason,
        health.message,
        int(obj["metadata"].get("generation") or 0),
        now,
    )
    return status


def health_of(plan: ProductPlan, metering: MeteringStatus) -> ConditionSpec:
    """``MeteringHealthy`` for the ledger ``metering`` under the spec's ``onFailure``."""
    failed = onfailure.failed_hours(metering, [r.name for r in plan.rules])
    return onfailure.health_condition(failed, plan.product.spec.metering.on_failure)
