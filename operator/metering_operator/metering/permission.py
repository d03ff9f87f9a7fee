"""The DryRun MeterUsage check of one product, and its ``MeteringPermitted`` condition.

Runs inside the metering cycle (Lease holder only), after sampling and before sending, when
:func:`metering_operator.domain.permission.due` says so: at the product's first cycle, after a
spec change, hourly while permitted, every 10 minutes while refused, and on a backoff while AWS
gives no usable answer. One DryRun call per dimension, with the operator's identity. The verdict
is written with the same resourceVersion precondition as the ledger, and an Event is posted when
it changes (``MeteringPermitted`` / ``MeteringNotPermitted``).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from metering_operator import metrics
from metering_operator.aws.errors import ErrorCategory, MeteringError
from metering_operator.domain import permission
from metering_operator.domain.conditions import get_condition, set_condition
from metering_operator.kube.events import EventType
from metering_operator.metering.plan import ProductPlan
from metering_operator.metering.request import permission_check_request
from metering_operator.metering.runtime import MeteringRuntime

log = logging.getLogger(__name__)


def _dry_run(rt: MeteringRuntime, plan: ProductPlan, dimension: str) -> permission.DryRunAnswer:
    request = permission_check_request(plan.product_code, dimension, rt.now(), uuid.uuid4().hex)
    try:
        result = rt.aws.meter_usage(request)
    except MeteringError as exc:
        transient = not exc.answered or exc.category in (ErrorCategory.RETRYABLE, ErrorCategory.OUT_OF_WINDOW)
        return permission.DryRunAnswer(dimension, exc.code, exc.message, transient)
    except Exception as exc:  # not an AWS answer: try again later
        log.exception("%s: DryRun MeterUsage for %s failed", plan.key, dimension)
        return permission.DryRunAnswer(dimension, type(exc).__name__, str(exc), transient=True)
    if not result.dry_run:
        # AWS must answer a dry run with DryRunOperation; a record id would mean it billed.
        log.error("%s: DryRun MeterUsage for %s returned a record: %s", plan.key, dimension, result)
    return permission.DryRunAnswer(dimension)


def check(rt: MeteringRuntime, obj: dict[str, Any], plan: ProductPlan) -> dict[str, Any]:
    """Check when due; returns the object as now stored (written, or ``obj`` unchanged).

    The verdict is written whenever the object does not show it (after a Conflict, or a status
    someone edited or wiped), not only right after a check. Raises
    :class:`~metering_operator.kube.status.Conflict` like every precondition write.
    """
    if not plan.rules:
        return obj
    meta = plan.product.metadata
    current = permission.fingerprint(
        meta.uid or plan.key, meta.generation or 0, plan.product_code, [r.name for r in plan.rules]
    )
    state = rt.permissions.get(plan.key)
    now = rt.now()
    if permission.due(state, current, now):
        answers = [_dry_run(rt, plan, rule.name) for rule in plan.rules]
        state = permission.after_check(state, current, answers, now, rt.check_policy)
        rt.permissions[plan.key] = state
    found = state.verdict if state is not None else None
    if found is None:
        return obj
    if found.status != "Unknown":
        metrics.METERING_PERMITTED.labels(meta.namespace or "", meta.name).set(
            1 if found.status == "True" else 0
        )
    status = dict(obj.get("status") or {})
    before = get_condition(status.get("conditions"), found.type)
    if before is not None and (before.get("status"), before.get("reason"), before.get("message")) == (
        found.status,
        found.reason,
        found.message,
    ):
        return obj
    status["conditions"] = set_condition(
        status.get("conditions"),
        found.type,
        found.status,
        found.reason,
        found.message,
        int(obj["metadata"].get("generation") or 0),
        now,
    )
    written = rt.store.write_status(obj, status)
    if before is None or before.get("status") != found.status or before.get("reason") != found.reason:
        kind: EventType = "Normal" if found.status == "True" else "Warning"
        event = "MeteringPermitted" if found.status == "True" else "MeteringNotPermitted"
        if found.status == "Unknown":
            event = "MeteringPermissionUnknown"
        rt.events.post(plan.ref(), kind, event, f"{found.reason}: {found.message}")
        log.info("%s: MeteringPermitted=%s (%s): %s", plan.key, found.status, found.reason, found.message)
    return written
