"""The metering ledger: a pure state machine that makes each dimension-hour billed exactly once.

It lives in ``status.metering`` of the MeteredProduct (the models are
:class:`metering_operator.domain.product.MeteringStatus` and friends; the operator has no other
durable store) and every transition here is a pure function ``MeteringStatus -> MeteringStatus``.
The handler reads status, applies a transition and writes it back with a resourceVersion
precondition, so of two writers only one can win.

Life of an hour, per dimension::

    open hour (running aggregate)  --hour ends-->  Pending (exact quantity + allocations, frozen)
    Pending --MeterUsage ok--> Sent (MeteringRecordId)
    Pending --final error--> Rejected (no more retries; the Metering condition says why)
    Pending --about to leave the 6-hour window--> Expired (carried into the open hour)

The send protocol built on it: the Pending entry is written BEFORE MeterUsage is called and
marked Sent AFTER. A crash in between leaves a Pending entry that is resent with the identical
quantity, allocations and ClientToken, which AWS answers idempotently with the same record id.
An entry's quantity never changes once written, so a resend can never cause DuplicateRequest.

Each attempt is claimed before the call (``attempts`` and ``lastAttemptAt`` written with the
precondition); the next attempt is due ``backoff(attempts)`` after the last one, so a second
process that also believes it leads cannot send the same attempt, and a restarted one resumes.

Per AWS guidance an hour is retried with exponential backoff for as long as it is inside the
window; when it is about to fall out (``window - expiry_margin`` after the hour starts) it is
marked Expired with ``carriedInto`` = the open hour, and when that hour closes its entry's
quantity includes the expired ones (``carriedFrom``) and their allocations. Nothing is dropped
silently: the ledger shows both ends of every carry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from metering_operator.domain import allocation as alloc
from metering_operator.domain.aggregation import (
    Aggregation,
    HourAggregate,
    Quantity,
    Rounding,
    Track,
    round_quantity,
)
from metering_operator.domain.clock import ensure_utc, hour_start
from metering_operator.domain.product import (
    AllocationAggregate,
    DimensionAggregate,
    LedgerAllocation,
    LedgerEntry,
    LedgerState,
    MeteringStatus,
    OpenHour,
    UsageTag,
)

AWS_WINDOW = timedelta(hours=6)
DRY_RUN_NOTE = "dry run: MeterUsage permissions checked, nothing billed"

__all__ = [
    "AWS_WINDOW",
    "DimensionRule",
    "LedgerEntry",
    "LedgerError",
    "LedgerState",
    "MeteringStatus",
    "Policy",
    "Sample",
    "claim",
    "client_token",
    "due",
    "expire",
    "mark_out_of_window",
    "mark_rejected",
    "mark_sent",
    "mark_transient",
    "observe",
    "prune",
    "tick",
]


class LedgerError(ValueError):
    """A transition that does not apply (unknown entry, entry not Pending, ...)."""


@dataclass(frozen=True)
class DimensionRule:
    """What the ledger needs of a spec dimension."""

    name: str
    aggregation: Aggregation
    rounding: Rounding

    @property
    def decimal(self) -> bool:
        return Rounding(self.rounding) is Rounding.DECIMAL


@dataclass(frozen=True)
class Sample:
    """A dimension's value at one instant, split by allocation tag set (keys from ``tag_key``)."""

    value: Decimal
    parts: Mapping[str, Decimal]


@dataclass(frozen=True)
class Policy:
    window: timedelta = AWS_WINDOW
    # Carry an hour this long before AWS would refuse it, so the carry is never too late.
    expiry_margin: timedelta = timedelta(minutes=10)
    initial_backoff: timedelta = timedelta(seconds=5)
    max_backoff: timedelta = timedelta(minutes=5)
    history: int = 48
    # Finished entries kept in status are also bounded in bytes: an entry can carry up to 2,500
    # allocations, and 48 such hours per dimension would push the object past etcd's size limit.
    history_bytes: int = 256 * 1024

    def backoff(self, attempts: int) -> timedelta:
        """Delay after ``attempts`` attempts: 5 s, 10 s, 20 s ... capped at 5 min.

        Deterministic on purpose: the next attempt time is derived from ``lastAttemptAt`` and
        ``attempts`` in status, so every replica agrees on it without storing it.
        """
        exponent = max(attempts - 1, 0)
        delay: timedelta = self.initial_backoff * (2 ** min(exponent, 30))
        return min(delay, self.max_backoff)

    def expires_at(self, hour: datetime) -> datetime:
        return hour + self.window - self.expiry_margin

    def next_attempt_at(self, entry: LedgerEntry) -> datetime | None:
        if entry.attempts == 0 or entry.last_attempt_at is None:
            return None
        return entry.last_attempt_at + self.backoff(entry.attempts)


# ---------------------------------------------------------------------------------------------
# conversions between status records and the aggregation/allocation types


def _fixed(value: Decimal) -> Decimal:
    # Status keeps exact decimals as fixed-point strings; normalise away exponents and -0.
    return Decimal(format(value, "f")) + Decimal(0)


def _tags(tags: Iterable[UsageTag]) -> alloc.TagSet:
    return alloc.normalise_tags([(t.key, t.value) for t in tags])


def _usage_tags(tags: alloc.TagSet) -> list[UsageTag]:
    return [UsageTag(key=k, value=v) for k, v in tags]


def aggregate_of(hour: datetime, dim: DimensionAggregate) -> HourAggregate:
    """The running aggregate stored for ``dim`` in the open hour starting at ``hour``."""
    parts = {
        alloc.tag_key(_tags(p.tags)): Track(p.weighted_sum, p.last_value, p.maximum) for p in dim.allocations
    }
    total = Track(dim.weighted_sum, dim.last_value, dim.maximum)
    return HourAggregate(hour=hour, last_at=dim.last_sample_at, total=total, parts=parts, samples=dim.samples)


def _dimension_record(name: str, agg: HourAggregate, first: datetime | None) -> DimensionAggregate:
    covered = Decimal(0)
    if first is not None and agg.last_at is not None:
        covered = Decimal((agg.last_at - first) // timedelta(microseconds=1)).scaleb(-6)
    return DimensionAggregate(
        name=name,
        first_sample_at=first,
        last_sample_at=agg.last_at,
        last_value=agg.total.last_value,
        weighted_sum=_fixed(agg.total.integral),
        covered_seconds=_fixed(covered),
        maximum=agg.total.maximum,
        samples=agg.samples,
        allocations=[
            AllocationAggregate(
                tags=_usage_tags(alloc.parse_tag_key(key)),
                last_value=track.last_value,
                weighted_sum=_fixed(track.integral),
                maximum=track.maximum,
            )
            for key, track in sorted(agg.parts.items())
        ],
    )


def entry_quantity(entry: LedgerEntry, rule: DimensionRule | None = None) -> Quantity:
    """The entry's quantity with its type: decimal for Decimal dimensions (or a fractional value)."""
    fractional = entry.quantity != entry.quantity.to_integral_value()
    return Quantity(entry.quantity, (rule.decimal if rule else False) or fractional)


def entry_allocations(entry: LedgerEntry, quantity: Quantity) -> list[alloc.Allocation]:
    return [
        alloc.Allocation(_tags(a.tags), Quantity(a.quantity, quantity.decimal)) for a in entry.allocations
    ]


def _allocation_records(items: Iterable[alloc.Allocation]) -> list[LedgerAllocation]:
    return [LedgerAllocation(tags=_usage_tags(a.tags), quantity=a.quantity.value) for a in items]


def client_token(product_uid: str, dimension: str, hour: datetime) -> str:
    """Deterministic ClientToken: a resend from any process reuses it (AWS then replays the record)."""
    digest = hashlib.sha256(f"{product_uid}\n{dimension}\n{hour.isoformat()}".encode()).hexdigest()
    return digest[:64]


def find(status: MeteringStatus, hour: datetime, dimension: str) -> LedgerEntry:
    for entry in status.ledger:
        if (entry.hour, entry.dimension) == (hour, dimension):
            return entry
    raise LedgerError(f"no ledger entry for {dimension} at {hour.isoformat()}")


def counts(status: MeteringStatus) -> dict[LedgerState, int]:
    result = dict.fromkeys(LedgerState, 0)
    for entry in status.ledger:
        result[entry.state] += 1
    return result


# ---------------------------------------------------------------------------------------------
# transitions


def tick(
    status: MeteringStatus,
    now: datetime,
    rules: Sequence[DimensionRule],
    policy: Policy,
    product_uid: str,
) -> MeteringStatus:
    """Bring the ledger up to ``now``: close finished hours into Pending entries, expire and carry.

    Hours the operator missed entirely (it was down) are closed with the last known value held
    constant, as the gap rule says. If the clock went backwards (the emulator clock was reset),
    the open hour is kept as it is until time catches up.
    """
    now = ensure_utc(now)
    current = hour_start(now)
    open_hour = status.open_hour
    ledger = list(status.ledger)
    if open_hour is None:
        open_hour = OpenHour(start=current)
    elif open_hour.start < current:
        open_hour, closed = _roll(open_hour, current, rules, ledger, product_uid)
        known = {(e.hour, e.dimension) for e in ledger}
        ledger.extend(e for e in closed if (e.hour, e.dimension) not in known)
    by_name = {d.name: d for d in open_hour.dimensions}
    # Dimensions added to the spec join the open hour empty; removed ones leave it.
    dims = [by_name.get(rule.name) or DimensionAggregate(name=rule.name) for rule in rules]
    open_hour = open_hour.model_copy(update={"dimensions": dims})
    status = status.model_copy(update={"open_hour": open_hour, "ledger": ledger})
    return expire(status, now, policy, rules)


def _roll(
    open_hour: OpenHour,
    current: datetime,
    rules: Sequence[DimensionRule],
    ledger: Sequence[LedgerEntry],
    product_uid: str,
) -> tuple[OpenHour, list[LedgerEntry]]:
    entries: list[LedgerEntry] = []
    next_dims: list[DimensionAggregate] = []
    by_name = {d.name: d for d in open_hour.dimensions}
    for rule in rules:
        dim = by_name.get(rule.name) or DimensionAggregate(name=rule.name)
        agg = aggregate_of(open_hour.start, dim)
        while agg.hour < current:
            entries.append(_close(agg, rule, ledger, product_uid))
            agg = agg.next_hour()
        first = agg.hour if agg.last_at is not None else None
        next_dims.append(_dimension_record(rule.name, agg, first))
    return OpenHour(start=current, dimensions=next_dims), entries


def _close(
    agg: HourAggregate, rule: DimensionRule, ledger: Sequence[LedgerEntry], product_uid: str
) -> LedgerEntry:
    own = round_quantity(agg.value(rule.aggregation), rule.rounding)
    weights = agg.part_weights(rule.aggregation)
    own_allocations = alloc.complete(own, alloc.allocate(own, weights)) if weights else []
    carried_entries = [
        e
        for e in ledger
        if e.state is LedgerState.EXPIRED and e.dimension == rule.name and e.carried_into == agg.hour
    ]
    total = own
    carried_allocations: list[alloc.Allocation] = []
    for entry in carried_entries:
        quantity, parts = _converted(entry, rule)
        total = total + quantity
        carried_allocations = alloc.merge(total.decimal, carried_allocations, parts)
    allocations: list[alloc.Allocation] = []
    if own_allocations or carried_allocations:
        # Whatever part has no tag set (e.g. carried usage without allocations) goes untagged.
        allocations = alloc.complete(total, alloc.merge(total.decimal, own_allocations, carried_allocations))
    return LedgerEntry(
        hour=agg.hour,
        dimension=rule.name,
        quantity=total.value,
        allocations=_allocation_records(allocations),
        client_token=client_token(product_uid, rule.name, agg.hour),
        carried_from=sorted(e.hour for e in carried_entries),
    )


def _converted(entry: LedgerEntry, rule: DimensionRule) -> tuple[Quantity, list[alloc.Allocation]]:
    quantity = entry_quantity(entry, rule)
    allocations = entry_allocations(entry, quantity)
    if quantity.decimal == rule.decimal:
        return quantity, allocations
    # The dimension's rounding changed type since: convert, rounding a decimal up so no usage is
    # lost, and let the untagged bucket take it.
    return round_quantity(quantity.value, Rounding.DECIMAL if rule.decimal else Rounding.UP), []


def observe(status: MeteringStatus, now: datetime, samples: Mapping[str, Sample]) -> MeteringStatus:
    """Add a sample per dimension to the open hour (call :func:`tick` first for the same ``now``)."""
    open_hour = status.open_hour
    now = ensure_utc(now)
    if open_hour is None or open_hour.start != hour_start(now):
        raise LedgerError(f"no open hour for {now.isoformat()}: tick the ledger before sampling")
    dims = []
    for dim in open_hour.dimensions:
        sample = samples.get(dim.name)
        agg = aggregate_of(open_hour.start, dim)
        if sample is None or (agg.last_at is not None and now < agg.last_at):
            dims.append(dim)
            continue
        first = dim.first_sample_at or (open_hour.start if agg.last_at is not None else now)
        dims.append(_dimension_record(dim.name, agg.observe(now, sample.value, sample.parts), first))
    return status.model_copy(update={"open_hour": open_hour.model_copy(update={"dimensions": dims})})


def expire(
    status: MeteringStatus, now: datetime, policy: Policy, rules: Sequence[DimensionRule]
) -> MeteringStatus:
    """Carry Pending entries about to leave the window into the open hour of their dimension.

    Only into the hour that is open *at* ``now``: if status still holds an earlier open hour
    (a send finished after the hour turned, before the next tick), the next :func:`tick` closes
    that hour first and then carries, so usage always lands in the hour being prepared.
    """
    if status.open_hour is not None and status.open_hour.start < hour_start(now):
        return status
    ledger = [
        _expire_one(e, status.open_hour, rules, "not accepted within the window")
        if e.state is LedgerState.PENDING and now >= policy.expires_at(e.hour)
        else e
        for e in status.ledger
    ]
    return status.model_copy(update={"ledger": ledger})


def _expire_one(
    entry: LedgerEntry, open_hour: OpenHour | None, rules: Sequence[DimensionRule], why: str
) -> LedgerEntry:
    metered = {rule.name for rule in rules}
    if open_hour is None or entry.dimension not in metered or open_hour.start <= entry.hour:
        return entry.model_copy(
            update={
                "state": LedgerState.EXPIRED,
                "last_error": f"{why}; dimension {entry.dimension} is no longer metered, usage not carried",
            }
        )
    detail = f" (last error: {entry.last_error})" if entry.last_error else ""
    return entry.model_copy(
        update={
            "state": LedgerState.EXPIRED,
            "carried_into": open_hour.start,
            "last_error": f"{why}; carried into the hour starting {open_hour.start.isoformat()}{detail}",
        }
    )


def due(status: MeteringStatus, now: datetime, policy: Policy) -> list[LedgerEntry]:
    """Pending entries to (re)send now, oldest first."""
    result = []
    for entry in status.ledger:
        if entry.state is not LedgerState.PENDING or now >= policy.expires_at(entry.hour):
            continue
        next_at = policy.next_attempt_at(entry)
        if next_at is None or next_at <= now:
            result.append(entry)
    return sorted(result, key=lambda e: (e.hour, e.dimension))


def _replace(status: MeteringStatus, entry: LedgerEntry, **update: object) -> MeteringStatus:
    current = find(status, entry.hour, entry.dimension)
    if current.state is not LedgerState.PENDING:
        raise LedgerError(
            f"entry {entry.dimension} at {entry.hour.isoformat()} is {current.state}, not Pending"
        )
    ledger = [e.model_copy(update=update) if e is current else e for e in status.ledger]
    return status.model_copy(update={"ledger": ledger})


def claim(status: MeteringStatus, entry: LedgerEntry, now: datetime) -> MeteringStatus:
    """Record an attempt about to be made; nobody else sends it before its backoff has passed."""
    current = find(status, entry.hour, entry.dimension)
    return _replace(status, entry, attempts=current.attempts + 1, last_attempt_at=now)


def mark_sent(
    status: MeteringStatus, entry: LedgerEntry, record_id: str | None, now: datetime, dry_run: bool = False
) -> MeteringStatus:
    status = _replace(
        status,
        entry,
        state=LedgerState.SENT,
        metering_record_id=record_id,
        sent_at=now,
        last_error=DRY_RUN_NOTE if dry_run else None,
    )
    return status.model_copy(update={"last_sent_hour": last_sent_hour(status)})


def last_sent_hour(status: MeteringStatus) -> datetime | None:
    """The latest hour with a real (not dry-run) Sent record and nothing of it still Pending."""
    hours: dict[datetime, list[LedgerEntry]] = {}
    for entry in status.ledger:
        hours.setdefault(entry.hour, []).append(entry)
    done = [
        hour
        for hour, entries in hours.items()
        if all(e.state is not LedgerState.PENDING for e in entries)
        and any(e.state is LedgerState.SENT and e.metering_record_id for e in entries)
    ]
    latest = max(done, default=None)
    previous = status.last_sent_hour
    if latest is None or (previous is not None and previous > latest):
        return previous
    return latest


def mark_transient(
    status: MeteringStatus,
    entry: LedgerEntry,
    error: str,
    now: datetime,
    policy: Policy,
    rules: Sequence[DimensionRule],
) -> MeteringStatus:
    """A retryable failure: keep Pending (next attempt after the backoff), or carry if too late."""
    return expire(_replace(status, entry, last_error=error), now, policy, rules)


def mark_rejected(status: MeteringStatus, entry: LedgerEntry, error: str) -> MeteringStatus:
    """A final refusal: no more attempts; the caller raises the Metering condition."""
    return _replace(status, entry, state=LedgerState.REJECTED, last_error=error)


def mark_out_of_window(
    status: MeteringStatus, entry: LedgerEntry, error: str, rules: Sequence[DimensionRule]
) -> MeteringStatus:
    """AWS refused the timestamp (TimestampOutOfBounds): carry the usage now."""
    current = find(status, entry.hour, entry.dimension)
    if current.state is not LedgerState.PENDING:
        raise LedgerError(
            f"entry {entry.dimension} at {entry.hour.isoformat()} is {current.state}, not Pending"
        )
    expired = _expire_one(current, status.open_hour, rules, f"refused by AWS ({error})")
    ledger = [expired if e is current else e for e in status.ledger]
    return status.model_copy(update={"ledger": ledger})


def prune(status: MeteringStatus, policy: Policy) -> MeteringStatus:
    """Keep Pending entries, Expired ones not yet taken over, and bounded finished history.

    Finished entries are kept up to ``history`` per dimension and ``history_bytes`` in all, newest
    first. Live entries are never dropped: they are what the send protocol still needs.
    """
    open_start = status.open_hour.start if status.open_hour else None

    def live(e: LedgerEntry) -> bool:
        if e.state is LedgerState.PENDING:
            return True
        carried = e.state is LedgerState.EXPIRED and e.carried_into is not None
        return (
            carried and open_start is not None and e.carried_into is not None and e.carried_into >= open_start
        )

    finished: dict[str, list[LedgerEntry]] = {}
    for entry in status.ledger:
        if not live(entry):
            finished.setdefault(entry.dimension, []).append(entry)
    kept: list[LedgerEntry] = []
    for entries in finished.values():
        entries.sort(key=lambda e: e.hour, reverse=True)
        kept.extend(entries[: policy.history])
    # Then the byte budget: newest first across dimensions, so the oldest history goes first.
    kept.sort(key=lambda e: e.hour, reverse=True)
    keep: set[tuple[datetime, str]] = set()
    used = 0
    for entry in kept:
        used += len(entry.model_dump_json(by_alias=True, exclude_none=True))
        if used > policy.history_bytes:
            break
        keep.add((entry.hour, entry.dimension))
    ledger = [e for e in status.ledger if live(e) or (e.hour, e.dimension) in keep]
    ledger.sort(key=lambda e: (e.hour, e.dimension))
    return status.model_copy(update={"ledger": ledger})


def metering_condition(
    status: MeteringStatus, dimensions: Sequence[str], dry_run: bool
) -> tuple[str, str, str]:
    """``(status, reason, message)`` of the Metering condition, from the ledger alone.

    Judged on each dimension's latest entry, so a dimension the listing refuses keeps the
    condition False (every new hour is refused again) while the others go on being reported.
    """
    latest: dict[str, LedgerEntry] = {}
    for entry in status.ledger:
        if entry.dimension in dimensions and (
            entry.dimension not in latest or entry.hour > latest[entry.dimension].hour
        ):
            latest[entry.dimension] = entry
    rejected = [e for e in latest.values() if e.state is LedgerState.REJECTED]
    if rejected:
        names = ", ".join(sorted(e.dimension for e in rejected))
        details = "; ".join(
            f"{e.dimension}: {e.last_error}" for e in sorted(rejected, key=lambda e: e.dimension)
        )
        others = len(dimensions) - len(rejected)
        tail = f"; {others} other dimension(s) continue" if others else ""
        return "False", "DimensionRejected", f"MeterUsage refused dimension(s) {names}: {details}{tail}"
    failing = sorted(
        (e for e in status.ledger if e.state is LedgerState.PENDING and e.last_error),
        key=lambda e: (e.hour, e.dimension),
    )
    if failing:
        first = failing[0]
        return (
            "False",
            "SendFailing",
            f"{len(failing)} record(s) not accepted yet, retrying within the 6-hour window; oldest "
            f"{first.dimension} at {first.hour.isoformat()}: {first.last_error}",
        )
    if dry_run:
        return "True", "DryRun", "dry run: MeterUsage permissions are checked each hour, nothing is billed"
    if status.last_sent_hour is None:
        return "True", "Sampling", "sampling; the first hour has not been reported yet"
    return (
        "True",
        "Reporting",
        f"usage reported through the hour starting {status.last_sent_hour.isoformat()}",
    )
