"""Hourly metering: thin kopf glue around the pure ledger (one daemon per MeteredProduct).

Each product with dimensions gets an async kopf daemon that, every sampling interval, runs one
blocking *cycle* in a worker thread (the sync Kubernetes client and boto3 never touch kopf's
event loop):

1. Only the Lease holder meters (:mod:`metering_operator.kube.leader`); others idle.
2. Read the MeteredProduct, sample every dimension from the watched pods/workloads, and apply
   the pure transitions ``tick`` (close finished hours into Pending entries, expire and carry)
   and ``observe`` (add the sample to the open hour).
3. Write status with a resourceVersion precondition when the ledger changed (immediately: the
   Pending entry must be durable BEFORE MeterUsage is called), when a sampled value changed
   (the gap rule reconstructs unchanged values exactly, so nothing else needs writing), or as a
   heartbeat at most every ``HEARTBEAT_SECONDS``. That bounds the write rate of the open hour.
4. Send due entries: claim them (one precondition write), call MeterUsage with the entry's
   frozen quantity, allocations and deterministic ClientToken, then record each outcome (Sent
   with the record id / retry later / Rejected / carried), each its own precondition write.

Test hook (documented, for crash tests only): ``MMO_CRASH_AT`` = ``before-ledger-write`` |
``after-ledger-write`` | ``after-call`` makes the process SIGKILL itself at that step of the send
protocol; with ``MMO_CRASH_MARKER=<path>`` it does so only if that file does not exist yet (and
creates it first), so a restarted process with the same environment runs on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import kopf

from metering_operator import metrics
from metering_operator.aws.client import MeteringClient
from metering_operator.aws.errors import ErrorCategory, MeteringError
from metering_operator.aws.models import MeterUsageRequest, Tag, UsageAllocation
from metering_operator.domain import ledger
from metering_operator.domain.aggregation import Aggregation, Rounding
from metering_operator.domain.clock import Clock, SystemClock, hour_start
from metering_operator.domain.conditions import get_condition, set_condition
from metering_operator.domain.pins import Pins, effective
from metering_operator.domain.product import GROUP, PLURAL, VERSION, MeteredProduct, MeteringStatus
from metering_operator.domain.sampling import Source, TagRule, measure
from metering_operator.kube.apiclient import new_api_client
from metering_operator.kube.events import EventPoster
from metering_operator.kube.leader import LeaseElector
from metering_operator.kube.observed import NotSynced, ObservedIndex
from metering_operator.kube.status import Conflict, Gone, StatusStore
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

CRASH_ENV = "MMO_CRASH_AT"
CRASH_MARKER_ENV = "MMO_CRASH_MARKER"
CRASH_STEPS = ("before-ledger-write", "after-ledger-write", "after-call")
HEARTBEAT_SECONDS = 300.0
OWNERS_REFRESH_SECONDS = 30.0
DEFAULT_INTERVAL = 60.0
# Codes that resending can never fix: the entry is Rejected. Other caller-side errors (missing
# IAM permission, bad credentials) are fixable by the seller without losing hours: retried.
FINAL_CALLER_ERRORS = frozenset(
    {
        "DuplicateRequestException",
        "IdempotencyConflictException",
        "InvalidUsageAllocationsException",
        "InvalidTagException",
        "ValidationException",
        "SerializationException",
        "ParamValidation",
    }
)


def crash_point(step: str) -> None:
    """Test hook: SIGKILL this process at ``step`` if ``MMO_CRASH_AT`` asks for it."""
    if os.environ.get(CRASH_ENV) != step:
        return
    marker = os.environ.get(CRASH_MARKER_ENV)
    if marker:
        path = Path(marker)
        if path.exists():
            return
        path.write_text(step)
    log.critical("test hook %s=%s: killing the process now", CRASH_ENV, step)
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ProductPlan:
    """What one cycle needs from the spec."""

    product: MeteredProduct
    rules: list[ledger.DimensionRule]
    sources: dict[str, Source]
    tags: dict[str, list[TagRule]]

    @classmethod
    def of(cls, product: MeteredProduct) -> ProductPlan:
        dims = product.spec.metering.dimensions
        return cls(
            product=product,
            rules=[
                ledger.DimensionRule(d.name, Aggregation(d.aggregation), Rounding(d.rounding)) for d in dims
            ],
            sources={d.name: Source(d.source) for d in dims},
            tags={
                d.name: [TagRule(t.key, t.from_label) for t in d.allocations.tags] if d.allocations else []
                for d in dims
            },
        )

    @property
    def dry_run(self) -> bool:
        return self.product.spec.metering.dry_run

    def rule(self, dimension: str) -> ledger.DimensionRule | None:
        return next((r for r in self.rules if r.name == dimension), None)


@dataclass
class MeteringRuntime:
    settings: OperatorSettings
    clock: Clock
    store: StatusStore
    index: ObservedIndex
    elector: LeaseElector
    aws: MeteringClient
    events: EventPoster
    policy: ledger.Policy
    last_write: dict[str, float] = field(default_factory=dict)
    cycles: int = 0
    _owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    _owners_read: float = -1e9

    def owner_of(self, product_code: str) -> tuple[str, str] | None:
        """Which MeteredProduct meters ``product_code`` (the oldest one with dimensions).

        AWS keeps one record per product code, caller, dimension and hour: a second product with
        the same code would collide with the first (DuplicateRequest, or worse an identical
        quantity answered with the first one's record). Until usage of such products is merged,
        only the oldest meters and the others say why.
        """
        stale = time.monotonic() - self._owners_read > OWNERS_REFRESH_SECONDS
        if stale or product_code not in self._owners:
            self._owners = metering_owners(
                self.store.list_products(self.settings.namespaces), self.settings.pins
            )
            self._owners_read = time.monotonic()
        return self._owners.get(product_code)

    def _product(self, obj: Mapping[str, Any]) -> MeteredProduct:
        """The seam: the product as metering obeys it (the seller's pins applied)."""
        return effective(self.settings.pins, MeteredProduct.from_kube(obj))

    def release(self, namespace: str, name: str) -> None:
        """The product was deleted or stopped metering: drop its informers, gauges and state."""
        key = f"{namespace}/{name}"
        self.index.release(key)
        self.last_write.pop(key, None)
        for state in ledger.LedgerState:
            metrics.LEDGER_ENTRIES.remove(namespace, name, state.value)  # absent labels: no-op

    # -- one cycle ----------------------------------------------------------------------------
    def cycle(self, namespace: str, name: str) -> None:
        if not self.elector.is_leader():
            return
        self.cycles += 1
        for _ in range(5):
            try:
                current = self._sample_and_close(namespace, name)
                if current is None:
                    return
                self._send_due(current)
                return
            except Conflict:
                continue  # someone else wrote in between: re-read and apply again
            except Gone:
                return

    def _sample_and_close(self, namespace: str, name: str) -> dict[str, Any] | None:
        """Sample and tick; returns the object as now stored (written or just read), or None."""
        key = f"{namespace}/{name}"
        obj = self.store.read(namespace, name)
        try:
            product = self._product(obj)
        except ValueError as exc:
            log.warning("%s/%s: cannot meter an invalid MeteredProduct: %s", namespace, name, exc)
            return None
        plan = ProductPlan.of(product)
        if not plan.rules:
            return None
        trusted = self.settings.trusted_product_codes
        if trusted and product.spec.product_code not in trusted:
            return None  # the entitlement side refuses it with a condition; never meter it
        now = self.clock.now()
        owner = self.owner_of(product.spec.product_code)
        if owner is not None and owner != (namespace, name):
            self._refuse_duplicate(obj, plan, owner, now)
            return None
        try:
            pods = self.index.pods(key, namespace, product.spec.selector)
            workloads = (
                self.index.workloads(key, namespace) if Source.REPLICAS in plan.sources.values() else []
            )
        except NotSynced as exc:
            log.warning("%s/%s: %s; sampling skipped", namespace, name, exc)
            pods, workloads = [], []
            samples: dict[str, ledger.Sample] = {}
        else:
            samples = {
                dim: measure(source, product.spec.selector, pods, workloads, plan.tags[dim])
                for dim, source in plan.sources.items()
            }
        uid = product.metadata.uid or f"{namespace}/{name}"
        before = product.status.metering
        after = ledger.tick(before, now, plan.rules, self.policy, uid)
        # After the emulator clock was set back, the open hour lies ahead of ``now``: hold
        # samples until time catches up rather than record them in the wrong hour.
        if samples and after.open_hour is not None and after.open_hour.start == hour_start(now):
            after = ledger.observe(after, now, samples)
        after = ledger.prune(after, self.policy)
        ledger_changed = after.ledger != before.ledger
        new_pending = {(e.hour, e.dimension) for e in after.ledger} - {
            (e.hour, e.dimension) for e in before.ledger
        }
        heartbeat_due = time.monotonic() - self.last_write.get(key, 0.0) >= HEARTBEAT_SECONDS
        if not (ledger_changed or _values_changed(before, after) or heartbeat_due):
            return obj
        if new_pending:
            crash_point("before-ledger-write")
        written = self.store.write_status(obj, self._status(obj, plan, after, now))
        self.last_write[key] = time.monotonic()
        self._export_ledger(namespace, name, after)
        if new_pending:
            log.info(
                "%s/%s: hour(s) closed, ledger entries Pending: %s",
                namespace,
                name,
                ", ".join(
                    f"{e.dimension}@{e.hour.isoformat()}={e.quantity}"
                    for e in after.ledger
                    if (e.hour, e.dimension) in new_pending
                ),
            )
            crash_point("after-ledger-write")
        self._events_for_new_carries(obj, before, after)
        return written

    def _status(
        self, obj: Mapping[str, Any], plan: ProductPlan, metering: MeteringStatus, now: datetime
    ) -> dict[str, Any]:
        status = dict(obj.get("status") or {})
        status["metering"] = metering.to_kube()
        condition, reason, message = ledger.metering_condition(
            metering, [r.name for r in plan.rules], plan.dry_run
        )
        status["conditions"] = set_condition(
            status.get("conditions"),
            "Metering",
            condition,  # type: ignore[arg-type]
            reason,
            message,
            int(obj["metadata"].get("generation") or 0),
            now,
        )
        return status

    def _refuse_duplicate(
        self, obj: dict[str, Any], plan: ProductPlan, owner: tuple[str, str], now: datetime
    ) -> None:
        code = plan.product.spec.product_code
        if self.settings.pins.for_code(code) is not None:
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
        self.store.write_status(obj, status)
        self.events.post(_ref(plan.product), "Warning", "DuplicateProductCode", message)

    # -- sending ------------------------------------------------------------------------------
    def _send_due(self, obj: dict[str, Any]) -> None:
        """Send what is due, starting from ``obj`` as just read or written (its resourceVersion)."""
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        product = self._product(obj)
        plan = ProductPlan.of(product)
        now = self.clock.now()
        status = product.status.metering
        due = [e for e in ledger.due(status, now, self.policy) if plan.rule(e.dimension) is not None]
        if not due:
            return
        claimed = status
        for entry in due:
            claimed = ledger.claim(claimed, entry, now)
        # The claim is the fence: if another writer got in first, Conflict aborts this round.
        self.store.write_status(obj, self._status(obj, plan, claimed, now))
        for entry in due:
            if not self.elector.is_leader():
                log.warning("%s/%s: lost the lease; leaving the rest to the new leader", namespace, name)
                return
            self._send_one(namespace, name, plan, entry)

    def _send_one(self, namespace: str, name: str, plan: ProductPlan, entry: ledger.LedgerEntry) -> None:
        rule = plan.rule(entry.dimension)
        assert rule is not None
        request = _request(plan, entry, rule)
        code = plan.product.spec.product_code
        try:
            result = self.aws.meter_usage(request)
        except MeteringError as exc:
            self._record_failure(namespace, name, plan, entry, exc)
            return
        except Exception as exc:  # not an AWS answer (e.g. a bug or a dead endpoint): retry later
            log.exception("%s/%s: MeterUsage for %s failed", namespace, name, entry.dimension)
            self._retry_later(namespace, name, plan, entry, f"{type(exc).__name__}: {exc}")
            return
        crash_point("after-call")
        record_id = result.metering_record_id
        self._record(
            namespace,
            name,
            plan,
            entry,
            lambda s, now: ledger.mark_sent(s, entry, record_id, now, result.dry_run),
        )
        if not result.dry_run:
            metrics.METERED_QUANTITY.labels(code, entry.dimension).inc(float(entry.quantity))
            metrics.LAST_SENT_HOUR.labels(code, entry.dimension).set(entry.hour.timestamp())
        log.info(
            "%s/%s: MeterUsage %s %s=%s -> %s",
            namespace,
            name,
            entry.hour.isoformat(),
            entry.dimension,
            entry.quantity,
            "dry run ok" if result.dry_run else record_id,
        )

    def _record_failure(
        self, namespace: str, name: str, plan: ProductPlan, entry: ledger.LedgerEntry, exc: MeteringError
    ) -> None:
        error = f"{exc.code}: {exc.message}"
        final = exc.category is ErrorCategory.DENIED or (
            exc.category is ErrorCategory.CALLER_BUG and exc.code in FINAL_CALLER_ERRORS
        )
        if exc.category is ErrorCategory.OUT_OF_WINDOW:
            self._record(
                namespace,
                name,
                plan,
                entry,
                lambda s, now: ledger.mark_out_of_window(s, entry, error, plan.rules),
            )
        elif final:
            self._record(namespace, name, plan, entry, lambda s, now: ledger.mark_rejected(s, entry, error))
            self.events.post(
                _ref(plan.product),
                "Warning",
                "MeteringRejected",
                f"MeterUsage refused dimension {entry.dimension} for the hour {entry.hour.isoformat()} "
                f"(quantity {entry.quantity}): {error}. Not retried; other dimensions continue.",
            )
        else:
            self._retry_later(namespace, name, plan, entry, error)
        log.warning(
            "%s/%s: MeterUsage %s %s: %s", namespace, name, entry.hour.isoformat(), entry.dimension, error
        )

    def _retry_later(
        self, namespace: str, name: str, plan: ProductPlan, entry: ledger.LedgerEntry, error: str
    ) -> None:
        self._record(
            namespace,
            name,
            plan,
            entry,
            lambda s, now: ledger.mark_transient(s, entry, error, now, self.policy, plan.rules),
        )

    def _record(
        self, namespace: str, name: str, plan: ProductPlan, entry: ledger.LedgerEntry, transition: Any
    ) -> None:
        """Apply an outcome to a fresh read, retrying on conflicts: an outcome is never lost."""

        def apply(obj: dict[str, Any]) -> dict[str, Any] | None:
            product = self._product(obj)
            current = product.status.metering
            try:
                found = ledger.find(current, entry.hour, entry.dimension)
            except ledger.LedgerError:
                return None
            if found.state is not ledger.LedgerState.PENDING:
                return None  # already settled (by us before a conflict, or by another writer)
            now = self.clock.now()
            return self._status(obj, ProductPlan.of(product), transition(current, now), now)

        written = self.store.update(namespace, name, apply, attempts=10)
        if written is not None:
            self._export_ledger(namespace, name, MeteredProduct.from_kube(written).status.metering)

    # -- observability ------------------------------------------------------------------------
    def _export_ledger(self, namespace: str, name: str, status: MeteringStatus) -> None:
        for state, count in ledger.counts(status).items():
            metrics.LEDGER_ENTRIES.labels(namespace, name, state.value).set(count)

    def _events_for_new_carries(
        self, obj: Mapping[str, Any], before: MeteringStatus, after: MeteringStatus
    ) -> None:
        expired_before = {
            (e.hour, e.dimension) for e in before.ledger if e.state is ledger.LedgerState.EXPIRED
        }
        product = MeteredProduct.from_kube(dict(obj))
        for entry in after.ledger:
            if (
                entry.state is ledger.LedgerState.EXPIRED
                and (entry.hour, entry.dimension) not in expired_before
            ):
                self.events.post(
                    _ref(product),
                    "Warning",
                    "MeteringCarried",
                    f"{entry.dimension} for the hour {entry.hour.isoformat()} (quantity "
                    f"{entry.quantity}) was not accepted in time: {entry.last_error}",
                )


def metering_owners(
    products: Sequence[Mapping[str, Any]], pins: Pins | None = None
) -> dict[str, tuple[str, str]]:
    """Product code -> (namespace, name) of the MeteredProduct that meters it: the pinned one for a
    pinned code (whatever exists, however old), otherwise the oldest with dimensions using it."""
    pinned = {p.product_code: (p.namespace, p.name) for p in (pins.pins if pins else ())}
    candidates: dict[str, tuple[str, str, str]] = {}
    for item in products:
        meta = item.get("metadata") or {}
        spec = item.get("spec") or {}
        if meta.get("deletionTimestamp") or not (spec.get("metering") or {}).get("dimensions"):
            continue
        code = str(spec.get("productCode") or "")
        key = (
            str(meta.get("creationTimestamp") or ""),
            str(meta.get("namespace") or ""),
            str(meta.get("name")),
        )
        if code and (code not in candidates or key < candidates[code]):
            candidates[code] = key
    return {code: (key[1], key[2]) for code, key in candidates.items()} | pinned


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


def _ref(product: MeteredProduct) -> dict[str, str]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "name": product.metadata.name,
        "namespace": product.metadata.namespace or "",
        "uid": product.metadata.uid or "",
    }


def _request(plan: ProductPlan, entry: ledger.LedgerEntry, rule: ledger.DimensionRule) -> MeterUsageRequest:
    quantity = ledger.entry_quantity(entry, rule)
    allocations = tuple(
        UsageAllocation(
            allocated_usage_quantity_decimal=a.quantity.value if quantity.decimal else None,
            allocated_usage_quantity=None if quantity.decimal else int(a.quantity.value),
            tags=tuple(Tag(key=k, value=v) for k, v in a.tags) or None,
        )
        for a in ledger.entry_allocations(entry, quantity)
    )
    fields: dict[str, Any] = {
        "product_code": plan.product.spec.product_code,
        "timestamp": entry.hour,
        "usage_dimension": entry.dimension,
        "client_token": entry.client_token,
        "usage_allocations": allocations or None,
        "dry_run": True if plan.dry_run else None,
    }
    if quantity.decimal:
        fields["usage_quantity_decimal"] = quantity.value
    else:
        fields["usage_quantity"] = int(quantity.value)
    return MeterUsageRequest(**fields)


# ---------------------------------------------------------------------------------------------
# kopf registration

_runtime_lock = threading.Lock()
_runtime: MeteringRuntime | None = None


def build_runtime(settings: OperatorSettings, clock: Clock) -> MeteringRuntime:
    api = new_api_client(pool_size=32)
    elector = LeaseElector(
        api,
        settings.operator_namespace,
        settings.lease_name,
        settings.operator_identity or f"{os.uname().nodename}-{os.getpid()}",
        settings.lease_duration_seconds,
    )
    elector.start()
    return MeteringRuntime(
        settings=settings,
        clock=clock,
        store=StatusStore(api),
        index=ObservedIndex(api),
        elector=elector,
        aws=MeteringClient.create(settings.region),
        events=EventPoster(api),
        policy=ledger.Policy(history=settings.ledger_history),
    )


def runtime(memo: Any) -> MeteringRuntime:
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            settings: OperatorSettings = memo.settings
            clock: Clock = getattr(memo, "clock", None) or SystemClock()
            _runtime = build_runtime(settings, clock)
        return _runtime


def _has_dimensions(spec: Mapping[str, Any], namespace: str | None, name: str, memo: Any, **_: Any) -> bool:
    """Whether the product meters: its effective spec has dimensions (a pinned product keeps its
    pinned dimensions when the buyer removes them, so its daemon keeps running)."""
    if (spec.get("metering") or {}).get("dimensions"):
        return True
    settings: OperatorSettings | None = getattr(memo, "settings", None)
    pin = settings.pins.at(namespace or "", name) if settings is not None else None
    return pin is not None and bool(pin.dimensions)


def interval_for(settings: OperatorSettings, spec: Mapping[str, Any]) -> float:
    if settings.sample_interval_seconds:
        return float(settings.sample_interval_seconds)
    return float((spec.get("metering") or {}).get("sampleIntervalSeconds") or DEFAULT_INTERVAL)


@kopf.daemon(GROUP, VERSION, PLURAL, id="metering", when=_has_dimensions, cancellation_timeout=10.0)
async def meter_product(
    *, name: str, namespace: str | None, spec: Any, stopped: kopf.DaemonStopped, memo: Any, **_: Any
) -> None:
    namespace = namespace or "default"
    rt = await asyncio.to_thread(runtime, memo)
    # Spread products over the interval so 50 of them do not sample in the same instant.
    await stopped.wait(random.uniform(0, min(interval_for(rt.settings, spec), 5.0)))
    try:
        while not stopped:
            try:
                await asyncio.to_thread(rt.cycle, namespace, name)
            except Exception:
                log.exception("%s/%s: metering cycle failed; retrying next interval", namespace, name)
            await stopped.wait(interval_for(rt.settings, spec))
    finally:
        # Deleted, or no dimensions any more: its watches must not outlive it.
        await asyncio.to_thread(rt.release, namespace, name)


@kopf.on.cleanup()
async def _release_lease(**_: Any) -> None:
    if _runtime is not None:
        await asyncio.to_thread(_runtime.elector.stop, True)


__all__: Sequence[str] = ["CRASH_STEPS", "MeteringRuntime", "crash_point", "meter_product", "runtime"]
