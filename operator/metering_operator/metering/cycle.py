"""One metering round for one product: sample, close hours, repair, send what is due.

Each product with dimensions (or with ledger entries still to send) runs :func:`run_cycle` every
sampling interval in a worker thread:

1. Only the Lease holder meters (:mod:`metering_operator.kube.leader`); others idle.
2. Read the MeteredProduct; put back live entries the status lost (:mod:`.journal`) and undo
   what cannot be true (:func:`~metering_operator.domain.ledger.repair`), each reported with an
   Event and the Metering condition's reason; sample every dimension from the watched
   pods/workloads; apply ``tick`` (close finished hours into Pending entries, settle expiring
   ones) and ``observe``.
3. Write status with a resourceVersion precondition when the ledger changed (immediately: the
   Pending entry must be durable BEFORE MeterUsage is called), when a sampled value changed
   (the gap rule reconstructs unchanged values exactly, so nothing else needs writing), or as a
   heartbeat at most every ``HEARTBEAT_SECONDS``. Then keep the journal in step.
   Every write also carries ``MeteringHealthy`` (``spec.metering.onFailure``, judged from the
   ledger by :mod:`metering_operator.domain.onfailure`), with an Event when it turns False or
   True again; a stored condition that differs from the ledger's verdict is itself a reason to
   write.
4. Run the DryRun permission check when it is due (:mod:`.permission`, ``MeteringPermitted``).
5. Send due entries (:mod:`.protocol`): claim them (one precondition write; each becomes
   Unknown), call MeterUsage with the request built from the entry alone (:mod:`.request`), and
   record each outcome with its own precondition write.

``now`` comes from the runtime's clock, which the API server's clock bounds, so one cycle never
closes hours that have not passed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from metering_operator import metrics
from metering_operator.domain import ledger, onfailure
from metering_operator.domain import permission as permission_check
from metering_operator.domain.clock import hour_start
from metering_operator.domain.conditions import get_condition, set_condition
from metering_operator.domain.product import LedgerState, MeteredProduct, MeteringStatus
from metering_operator.domain.sampling import Source, measure
from metering_operator.kube.observed import NotSynced
from metering_operator.kube.status import Conflict, Gone
from metering_operator.metering import permission, protocol
from metering_operator.metering.hooks import crash_point
from metering_operator.metering.plan import ProductPlan, product_as_metered
from metering_operator.metering.request import meter_usage_request
from metering_operator.metering.runtime import MeteringRuntime
from metering_operator.metering.status import health_of, metering_status

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 300.0


def run_cycle(rt: MeteringRuntime, namespace: str, name: str) -> None:
    if not rt.elector.is_leader():
        return
    rt.cycles += 1
    for _ in range(5):
        try:
            current = _sample_and_close(rt, namespace, name)
            if current is None:
                return
            current = permission.check(
                rt, current, ProductPlan.of(product_as_metered(rt.settings.pins, current))
            )
            _send_due(rt, current)
            return
        except Conflict:
            continue  # someone else wrote in between: re-read and apply again
        except Gone:
            return


def _sample_and_close(rt: MeteringRuntime, namespace: str, name: str) -> dict[str, Any] | None:
    """Sample, repair and tick; returns the object as now stored (written or just read), or None."""
    key = f"{namespace}/{name}"
    obj = rt.store.read(namespace, name)
    try:
        product = product_as_metered(rt.settings.pins, obj)
    except ValueError as exc:
        log.warning("%s: cannot meter an invalid MeteredProduct: %s", key, exc)
        return None
    plan = ProductPlan.of(product)
    before = product.status.metering
    if not plan.rules and not ledger.live_entries(before):
        return None
    trusted = rt.settings.trusted_product_codes
    if trusted and plan.product_code not in trusted:
        return None  # the entitlement side refuses it with a condition; never meter it
    now = rt.now()
    owner = rt.owner_of(plan.product_code)
    if plan.rules and owner is not None and owner != (namespace, name):
        _refuse_duplicate(rt, obj, plan, owner, now)
        return None
    samples = _samples(rt, key, plan)
    after, findings = _restored_and_repaired(rt, plan, before, now)
    after = ledger.tick(after, now, plan.rules, rt.policy, product.metadata.uid or key)
    if samples and after.open_hour is not None and after.open_hour.start == hour_start(now):
        after = ledger.observe(after, now, samples)
    after = ledger.prune(after, rt.policy)
    if findings:
        rt.repairs[key] = ("; ".join(findings), hour_start(now))
    repair = rt.repairs.get(key)
    repaired = repair[0] if repair and repair[1] == hour_start(now) else None
    ledger_changed = after.ledger != before.ledger
    new_pending = {(e.hour, e.dimension) for e in after.ledger} - {
        (e.hour, e.dimension) for e in before.ledger
    }
    heartbeat_due = time.monotonic() - rt.last_write.get(key, 0.0) >= HEARTBEAT_SECONDS
    stored_health = get_condition((obj.get("status") or {}).get("conditions"), onfailure.HEALTHY)
    health = health_of(plan, after)
    health_stale = stored_health is None or (stored_health.get("status"), stored_health.get("reason")) != (
        health.status,
        health.reason,
    )
    if not (ledger_changed or findings or _values_changed(before, after) or heartbeat_due or health_stale):
        rt.journal.save(namespace, name, plan.product_code, after)
        return obj
    if new_pending:
        crash_point("before-ledger-write")
    written = rt.store.write_status(obj, metering_status(obj, plan, after, now, repaired))
    rt.last_write[key] = time.monotonic()
    rt.journal.save(namespace, name, plan.product_code, after)
    _export_ledger(namespace, name, after)
    if new_pending:
        log.info(
            "%s: hour(s) closed, ledger entries Pending: %s",
            key,
            ", ".join(
                f"{e.dimension}@{e.hour.isoformat()}={e.quantity}"
                for e in after.ledger
                if (e.hour, e.dimension) in new_pending
            ),
        )
        crash_point("after-ledger-write")
    if findings:
        metrics.STATUS_REPAIRS.labels(namespace, name).inc()
        message = "; ".join(findings)
        log.warning("%s: metering status repaired: %s", key, message)
        rt.events.post(plan.ref(), "Warning", "MeteringStatusRepaired", message)
    _events_for_settled(rt, plan, before, after)
    _report_health(rt, plan, stored_health, after)
    return written


def _samples(rt: MeteringRuntime, key: str, plan: ProductPlan) -> dict[str, ledger.Sample]:
    if not plan.rules:
        return {}
    product = plan.product
    namespace = product.metadata.namespace or "default"
    try:
        pods = rt.index.pods(key, namespace, product.spec.selector)
        workloads = rt.index.workloads(key, namespace) if Source.REPLICAS in plan.sources.values() else []
    except NotSynced as exc:
        log.warning("%s: %s; sampling skipped", key, exc)
        return {}
    return {
        dim: measure(source, product.spec.selector, pods, workloads, plan.tags[dim])
        for dim, source in plan.sources.items()
    }


def _restored_and_repaired(
    rt: MeteringRuntime, plan: ProductPlan, status: MeteringStatus, now: datetime
) -> tuple[MeteringStatus, list[str]]:
    meta = plan.product.metadata
    saved = rt.journal.load(meta.namespace or "default", meta.name, plan.product_code)
    findings: list[str] = []
    if saved is not None:
        status, found = ledger.restore(status, saved, now)
        findings += found
    status, found = ledger.repair(status, now)
    return status, findings + found


def _refuse_duplicate(
    rt: MeteringRuntime, obj: dict[str, Any], plan: ProductPlan, owner: tuple[str, str], now: datetime
) -> None:
    code = plan.product_code
    if rt.settings.pins.for_code(code) is not None:
        message = (
            f"product code {code} is pinned to MeteredProduct {owner[0]}/{owner[1]} by the "
            "seller; this one is not metered"
        )
    else:
        message = (
            f"product code {code} is already metered by MeteredProduct "
            f"{owner[0]}/{owner[1]}; AWS keeps one record per product code, dimension and hour, "
            "so this one is not metered"
        )
    status = dict(obj.get("status") or {})
    before = get_condition(status.get("conditions"), "Metering")
    if before and (before.get("reason"), before.get("message")) == ("DuplicateProductCode", message):
        return
    status["conditions"] = set_condition(
        status.get("conditions"),
        "Metering",
        "False",
        "DuplicateProductCode",
        message,
        int(obj["metadata"].get("generation") or 0),
        now,
    )
    rt.store.write_status(obj, status)
    rt.events.post(plan.ref(), "Warning", "DuplicateProductCode", message)


# -- sending ----------------------------------------------------------------------------------


def _send_due(rt: MeteringRuntime, obj: dict[str, Any]) -> None:
    """Send what is due, starting from ``obj`` as just read or written (its resourceVersion).

    Entries of dimensions no longer in the spec are sent too: removing a dimension must not
    abandon hours already closed.
    """
    product = product_as_metered(rt.settings.pins, obj)
    plan = ProductPlan.of(product)
    now = rt.now()
    status = product.status.metering
    due = ledger.due(status, now, rt.policy)
    if not due:
        return
    claimed = status
    for entry in due:
        claimed = ledger.claim(claimed, entry, now)
    # The claim is the fence: if another writer got in first, Conflict aborts this round.
    repair = rt.repairs.get(plan.key)
    repaired = repair[0] if repair and repair[1] == hour_start(now) else None
    rt.store.write_status(obj, metering_status(obj, plan, claimed, now, repaired))
    for entry in due:
        if not rt.elector.is_leader():
            log.warning("%s: lost the lease; leaving the rest to the new leader", plan.key)
            return
        _send_one(rt, plan, entry)


def _send_one(rt: MeteringRuntime, plan: ProductPlan, entry: ledger.LedgerEntry) -> None:
    request = meter_usage_request(
        plan.product_code, entry, dry_run=plan.dry_run, rule=plan.rule(entry.dimension)
    )
    outcome = protocol.call(rt.aws, request)
    crash_point("after-call")
    _record(rt, plan, entry, protocol.transition(outcome, entry, rt.policy, plan.rules))
    match outcome:
        case protocol.Accepted(record_id=record_id, dry_run=dry_run):
            # An accepted record proves the permission: a refused check is repeated at once.
            checked = permission_check.recheck_soon(rt.permissions.get(plan.key), rt.now())
            if checked is not None:
                rt.permissions[plan.key] = checked
            if not dry_run:
                metrics.METERED_QUANTITY.labels(plan.product_code, entry.dimension).inc(float(entry.quantity))
                metrics.LAST_SENT_HOUR.labels(plan.product_code, entry.dimension).set(entry.hour.timestamp())
            log.info(
                "%s: MeterUsage %s %s=%s -> %s",
                plan.key,
                entry.hour.isoformat(),
                entry.dimension,
                entry.quantity,
                "dry run ok" if dry_run else record_id,
            )
        case protocol.Refused(error=error, disposition=disposition):
            if disposition is protocol.MeterUsageDisposition.FINAL:
                rt.events.post(
                    plan.ref(),
                    "Warning",
                    "MeteringRejected",
                    f"MeterUsage refused dimension {entry.dimension} for the hour {entry.hour.isoformat()} "
                    f"(quantity {entry.quantity}): {error}. Not retried; other dimensions continue.",
                )
            log.warning("%s: MeterUsage %s %s: %s", plan.key, entry.hour.isoformat(), entry.dimension, error)
        case protocol.NoAnswer(error=error):
            log.warning(
                "%s: MeterUsage %s %s got no answer (%s): Unknown, resent identically",
                plan.key,
                entry.hour.isoformat(),
                entry.dimension,
                error,
            )


def _record(
    rt: MeteringRuntime, plan: ProductPlan, entry: ledger.LedgerEntry, transition: protocol.Transition
) -> None:
    """Apply an outcome to a fresh read, retrying on conflicts: an outcome is never lost."""
    meta = plan.product.metadata
    namespace, name = meta.namespace or "default", meta.name
    settled: list[tuple[MeteringStatus, MeteringStatus]] = []
    stored_health: list[Mapping[str, Any] | None] = [None]

    def apply(obj: dict[str, Any]) -> dict[str, Any] | None:
        product = product_as_metered(rt.settings.pins, obj)
        current = product.status.metering
        try:
            found = ledger.find(current, entry.hour, entry.dimension)
        except ledger.LedgerError:
            return None
        if found.state not in ledger.LIVE:
            return None  # already settled (by us before a conflict, or by another writer)
        now = rt.now()
        after = transition(current, now)
        settled[:] = [(current, after)]
        stored_health[0] = get_condition((obj.get("status") or {}).get("conditions"), onfailure.HEALTHY)
        return metering_status(obj, ProductPlan.of(product), after, now)

    written = rt.store.update(namespace, name, apply, attempts=10)
    if written is not None:
        _export_ledger(namespace, name, MeteredProduct.from_kube(written).status.metering)
        for before, after in settled:
            _events_for_settled(rt, plan, before, after)
            effective = ProductPlan.of(product_as_metered(rt.settings.pins, written))
            _report_health(rt, effective, stored_health[0], after)


# -- observability ----------------------------------------------------------------------------


def _export_ledger(namespace: str, name: str, status: MeteringStatus) -> None:
    for state, count in ledger.counts(status).items():
        metrics.LEDGER_ENTRIES.labels(namespace, name, state.value).set(count)


def _events_for_settled(
    rt: MeteringRuntime, plan: ProductPlan, before: MeteringStatus, after: MeteringStatus
) -> None:
    """An Event (and for Unconfirmed a metric) for each entry that became Expired or Unconfirmed."""
    was = {(e.hour, e.dimension): e.state for e in before.ledger}
    for entry in after.ledger:
        if was.get((entry.hour, entry.dimension)) is entry.state:
            continue
        if entry.state is LedgerState.EXPIRED:
            rt.events.post(
                plan.ref(),
                "Warning",
                "MeteringCarried",
                f"{entry.dimension} for the hour {entry.hour.isoformat()} (quantity "
                f"{entry.quantity}) was not accepted in time: {entry.last_error}",
            )
        elif entry.state is LedgerState.UNCONFIRMED:
            metrics.LEDGER_UNCONFIRMED.labels(plan.product_code, entry.dimension).inc()
            rt.events.post(
                plan.ref(),
                "Warning",
                "MeteringUnconfirmed",
                f"{entry.dimension} for the hour {entry.hour.isoformat()} (quantity {entry.quantity}): "
                f"{entry.last_error}",
            )


def _report_health(
    rt: MeteringRuntime, plan: ProductPlan, stored: Mapping[str, Any] | None, after: MeteringStatus
) -> None:
    """The failed-hours metric, and an Event when ``MeteringHealthy`` turns False or True again."""
    meta = plan.product.metadata
    failed = onfailure.failed_hours(after, [r.name for r in plan.rules])
    metrics.FAILED_HOURS.labels(meta.namespace or "", meta.name).set(failed.count)
    health = health_of(plan, after)
    was = stored.get("status") if stored is not None else None
    if health.status == "False" and was != "False":
        log.warning("%s: %s", plan.key, health.message)
        rt.events.post(plan.ref(), "Warning", onfailure.NOT_REPORTED, health.message)
    elif health.status == "True" and was == "False":
        log.info("%s: usage is reported again: %s", plan.key, health.message)
        rt.events.post(
            plan.ref(), "Normal", "UsageReportingRecovered", f"an hour was reported again: {health.message}"
        )


def _values_changed(before: MeteringStatus, after: MeteringStatus) -> bool:
    if before.open_hour is None or after.open_hour is None:
        return before.open_hour is not after.open_hour
    if before.open_hour.start != after.open_hour.start:
        return True
    old = {
        d.name: (d.last_value, [(a.tags, a.last_value) for a in d.allocations])
        for d in before.open_hour.dimensions
    }
    new = {
        d.name: (d.last_value, [(a.tags, a.last_value) for a in d.allocations])
        for d in after.open_hour.dimensions
    }
    return old != new
