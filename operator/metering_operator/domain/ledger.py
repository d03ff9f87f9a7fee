"""The metering ledger: a pure state machine that makes each dimension-hour billed at most once.

It lives in ``status.metering`` of the MeteredProduct (the models are
:class:`metering_operator.domain.product.MeteringStatus` and friends) and every transition here is
a pure function ``MeteringStatus -> MeteringStatus``. The caller reads status, applies a
transition and writes it back with a resourceVersion precondition, so of two writers only one
can win. (A copy of the live entries is kept where only the operator writes: see
:mod:`metering_operator.metering.journal`.)

Life of an hour, per dimension (docs/metering.md has the whole story)::

    open hour (running aggregate) --hour ends--> Pending (exact quantity + allocations, frozen)
    Pending --claim (before the call)--> Unknown
    Unknown --answer: record id--> Sent
    Unknown --answer: retryable error--> Pending (if no earlier call is unanswered) or Unknown
    Unknown --no answer (timeout, reset, crash)--> Unknown (resent identically, after a backoff)
    Pending|Unknown --answer: final error--> Rejected
    Pending --window about to close--> Expired (every call was refused: usage carried forward)
    Unknown --window about to close--> Unconfirmed (AWS may have billed it: never carried)

The protocol: the Pending entry is written BEFORE MeterUsage is called and the claim (the entry
turned Unknown, ``attempts`` + 1) is written before each call, so a crash anywhere leaves an
entry that says whether a call may have reached AWS. An entry's request never changes once
written (quantity, type, allocations, timestamp, ClientToken): a resend is answered
idempotently with the first call's record id, so it can never bill twice.

Which answers are certain matters: AWS answering with an error billed nothing (``answered``
counts those calls), while a call without an answer may have been recorded. Usage is carried
into a later hour only when every call made for the hour was answered with an error; an hour
whose outcome is still unknown when the window closes is recorded Unconfirmed -- a visible,
possible shortfall, never a possible double bill.

Invariant (checked by the property test in tests/unit/test_ledger.py): per dimension, the sum of
what AWS billed equals the sum of what was used, except for Unconfirmed hours whose records
never arrived (the shortfall is then visible in the ledger); it never exceeds it.
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
#: A journal copy of an entry older than this is stale (the status kept it far longer, or it
#: was settled and pruned since): never restored, so a stale copy cannot loop.
RESTORE_HORIZON = timedelta(hours=24)
#: Entries the send protocol still works on.
LIVE = frozenset({LedgerState.PENDING, LedgerState.UNKNOWN})

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
    "mark_no_answer",
    "mark_out_of_window",
    "mark_rejected",
    "mark_sent",
    "mark_transient",
    "observe",
    "prune",
    "repair",
    "restorable",
    "restore",
    "tick",
]


class LedgerError(ValueError):
    """A transition that does not apply (unknown entry, entry already settled, ...)."""


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
    """The entry's quantity with its type, as fixed when the entry was written.

    Entries written before the type was recorded take it from the dimension's rule (decimal
    for Decimal dimensions) or from the value itself (a fractional value is decimal).
    """
    if entry.decimal is not None:
        return Quantity(entry.quantity, entry.decimal)
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
        decimal=total.decimal,
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
    """Settle Pending and Unknown entries whose window is about to close.

    Pending ones (AWS refused every call: nothing billed) are carried into the open hour of
    their dimension; Unknown ones (a call may have been recorded) become Unconfirmed and are
    not carried. Only into the hour that is open *at* ``now``: if status still holds an earlier
    open hour (a send finished after the hour turned, before the next tick), the next
    :func:`tick` closes that hour first and then carries, so usage always lands in the hour
    being prepared.
    """
    if status.open_hour is not None and status.open_hour.start < hour_start(now):
        return status
    ledger = [
        _settle_expired(e, status.open_hour, rules, "not accepted within the window")
        if e.state in LIVE and now >= policy.expires_at(e.hour)
        else e
        for e in status.ledger
    ]
    return status.model_copy(update={"ledger": ledger})


def _settle_expired(
    entry: LedgerEntry, open_hour: OpenHour | None, rules: Sequence[DimensionRule], why: str
) -> LedgerEntry:
    if entry.state is LedgerState.UNKNOWN:
        unanswered = entry.attempts - entry.answered
        return entry.model_copy(
            update={
                "state": LedgerState.UNCONFIRMED,
                "last_error": f"{why}; {unanswered} call(s) got no answer, so AWS may have recorded the "
                f"hour: not carried, not billed again (last error: {entry.last_error})",
            }
        )
    return _expire_one(entry, open_hour, rules, why)


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
    """Pending and Unknown entries to (re)send now, oldest first."""
    result = []
    for entry in status.ledger:
        if entry.state not in LIVE or now >= policy.expires_at(entry.hour):
            continue
        next_at = policy.next_attempt_at(entry)
        if next_at is None or next_at <= now:
            result.append(entry)
    return sorted(result, key=lambda e: (e.hour, e.dimension))


def _current(status: MeteringStatus, entry: LedgerEntry) -> LedgerEntry:
    current = find(status, entry.hour, entry.dimension)
    if current.state not in LIVE:
        raise LedgerError(
            f"entry {entry.dimension} at {entry.hour.isoformat()} is {current.state}, not Pending or Unknown"
        )
    return current


def _replace(status: MeteringStatus, entry: LedgerEntry, **update: object) -> MeteringStatus:
    current = _current(status, entry)
    ledger = [e.model_copy(update=update) if e is current else e for e in status.ledger]
    return status.model_copy(update={"ledger": ledger})


def claim(status: MeteringStatus, entry: LedgerEntry, now: datetime) -> MeteringStatus:
    """Record a call about to be made: the entry is Unknown until its answer is recorded.

    Written before the call, so a crash after it leaves an entry that says a call may have
    reached AWS; nobody sends it again before its backoff has passed.
    """
    current = _current(status, entry)
    return _replace(
        status, entry, attempts=current.attempts + 1, last_attempt_at=now, state=LedgerState.UNKNOWN
    )


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
    """The latest hour with a real (not dry-run) Sent record and nothing of it still live."""
    hours: dict[datetime, list[LedgerEntry]] = {}
    for entry in status.ledger:
        hours.setdefault(entry.hour, []).append(entry)
    done = [
        hour
        for hour, entries in hours.items()
        if all(e.state not in LIVE for e in entries)
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
    """AWS answered with a retryable error: that call billed nothing.

    The entry is Pending again if every call made for it was answered, else it stays Unknown
    (an earlier call may have been recorded). Retried after the backoff; settled by
    :func:`expire` when the window is about to close.
    """
    current = _current(status, entry)
    answered = min(current.answered + 1, current.attempts)
    state = LedgerState.PENDING if answered >= current.attempts else LedgerState.UNKNOWN
    status = _replace(status, entry, answered=answered, state=state, last_error=error)
    return expire(status, now, policy, rules)


def mark_no_answer(
    status: MeteringStatus,
    entry: LedgerEntry,
    error: str,
    now: datetime,
    policy: Policy,
    rules: Sequence[DimensionRule],
) -> MeteringStatus:
    """The call's answer never arrived (read timeout, connection reset after sending): Unknown.

    Resent identically after the backoff; AWS answers a resend of a recorded hour with the
    same record id.
    """
    _current(status, entry)
    status = _replace(status, entry, state=LedgerState.UNKNOWN, last_error=f"no answer: {error}")
    return expire(status, now, policy, rules)


def mark_rejected(status: MeteringStatus, entry: LedgerEntry, error: str) -> MeteringStatus:
    """A final refusal: no more attempts; the caller raises the Metering condition."""
    current = _current(status, entry)
    if current.attempts > current.answered + 1:
        error = f"{error} (an earlier call got no answer: AWS may have recorded the hour)"
    return _replace(status, entry, state=LedgerState.REJECTED, last_error=error)


def mark_out_of_window(
    status: MeteringStatus,
    entry: LedgerEntry,
    error: str,
    now: datetime,
    policy: Policy,
    rules: Sequence[DimensionRule],
) -> MeteringStatus:
    """AWS refused the timestamp (TimestampOutOfBounds).

    While the hour is inside the window by the operator's clock (which is bounded by the API
    server's), the refusal can only mean the timestamp is in AWS's future -- a clock
    difference, transient: retried later like any retryable error. Past that, the hour really
    left the window: settled now (carried if nothing was billed, Unconfirmed if unknown).
    """
    if now < policy.expires_at(entry.hour):
        return mark_transient(
            status, entry, f"{error} (refused as not yet valid: retried)", now, policy, rules
        )
    current = _current(status, entry)
    answered = min(current.answered + 1, current.attempts)
    state = LedgerState.PENDING if answered >= current.attempts else LedgerState.UNKNOWN
    settled = _settle_expired(
        current.model_copy(update={"answered": answered, "state": state, "last_error": error}),
        status.open_hour,
        rules,
        f"refused by AWS ({error})",
    )
    ledger = [settled if e is current else e for e in status.ledger]
    return status.model_copy(update={"ledger": ledger})


def repair(status: MeteringStatus, now: datetime) -> tuple[MeteringStatus, list[str]]:
    """Undo what cannot be true in a status someone edited; returns the status and what was found.

    * an open hour that starts after the current hour (it would freeze metering until then):
      dropped, so :func:`tick` opens the current hour;
    * ledger entries for hours that have not ended: removed (nobody used them yet);
    * a Sent entry without a MeteringRecordId (and not a dry run): made Unknown, so it is resent
      identically; AWS answers a resend of a recorded hour with its record id, so this is
      harmless if it really was sent;
    * a Pending entry with calls not answered (only an edit or an older operator writes that):
      made Unknown, so it is never carried while AWS may have recorded it.
    """
    now = ensure_utc(now)
    current = hour_start(now)
    findings: list[str] = []
    open_hour = status.open_hour
    if open_hour is not None and open_hour.start > current:
        findings.append(
            f"openHour.start {open_hour.start.isoformat()} is after the current hour {current.isoformat()}: "
            "its samples were dropped and the current hour opened"
        )
        open_hour = None
    ledger: list[LedgerEntry] = []
    for entry in status.ledger:
        where = f"{entry.dimension} at {entry.hour.isoformat()}"
        if entry.hour >= current:
            findings.append(f"ledger entry {where} is for an hour that has not ended: removed")
            continue
        if entry.answered > entry.attempts:
            entry = entry.model_copy(update={"answered": entry.attempts})
        if (
            entry.state is LedgerState.SENT
            and not entry.metering_record_id
            and entry.last_error != DRY_RUN_NOTE
        ):
            findings.append(f"ledger entry {where} is Sent without a MeteringRecordId: resent identically")
            entry = entry.model_copy(
                update={"state": LedgerState.UNKNOWN, "attempts": max(entry.attempts, 1), "answered": 0}
            )
        elif entry.state is LedgerState.PENDING and entry.attempts > entry.answered:
            findings.append(
                f"ledger entry {where} is Pending with {entry.attempts - entry.answered} unanswered call(s): "
                "made Unknown (never carried while AWS may have recorded it)"
            )
            entry = entry.model_copy(update={"state": LedgerState.UNKNOWN})
        ledger.append(entry)
    if not findings:
        return status, []
    return status.model_copy(update={"open_hour": open_hour, "ledger": ledger}), findings


def live_entries(status: MeteringStatus) -> list[LedgerEntry]:
    """What must survive a lost status: Pending/Unknown entries and carries not yet taken over."""
    open_start = status.open_hour.start if status.open_hour else None
    return [
        e
        for e in status.ledger
        if e.state in LIVE
        or (
            e.state is LedgerState.EXPIRED
            and e.carried_into is not None
            and open_start is not None
            and e.carried_into >= open_start
        )
    ]


def restore(status: MeteringStatus, saved: MeteringStatus, now: datetime) -> tuple[MeteringStatus, list[str]]:
    """Put back live entries (and the open hour) that ``status`` lost or edited but ``saved`` has.

    ``saved`` is the operator's own copy (its journal). A restored Pending or Unknown entry comes
    back Unknown: the copy may predate a call, and an Unknown entry is resent identically and
    never carried, so a restore can neither lose a record nor bill one twice (one whose window
    has closed becomes Unconfirmed at the next :func:`expire`: a visible shortfall).

    The saved open hour comes back only if it is the current or the previous hour: an older one
    would close every hour since at its last value, for a product that may not have existed
    then (deleted, re-created hours later).
    """
    now = ensure_utc(now)
    current = hour_start(now)
    have = {(e.hour, e.dimension) for e in status.ledger}
    back: list[LedgerEntry] = []
    for entry in live_entries(saved):
        if (entry.hour, entry.dimension) in have or not current - RESTORE_HORIZON <= entry.hour < current:
            continue
        if entry.state is LedgerState.EXPIRED and (
            entry.carried_into is None or entry.carried_into < current - timedelta(hours=1)
        ):
            continue  # its carry was taken over already (a copy older than the last hour close)
        if entry.state in LIVE:
            entry = entry.model_copy(
                update={"state": LedgerState.UNKNOWN, "attempts": max(entry.attempts, 1), "answered": 0}
            )
        back.append(entry)
    findings: list[str] = []
    # A live entry's request is frozen when the hour closes: one that differs from the saved copy
    # was edited (a lower quantity would bill less than was used). The saved request is put back,
    # Unknown, since the edited one may have been sent already.
    frozen = {"quantity", "decimal", "allocations", "client_token", "carried_from"}
    saved_live = {(e.hour, e.dimension): e for e in saved.ledger if e.state in LIVE}
    edited: dict[tuple[datetime, str], LedgerEntry] = {}
    for entry in status.ledger:
        copy = saved_live.get((entry.hour, entry.dimension))
        if (
            entry.state in LIVE
            and copy is not None
            and entry.model_dump(include=frozen) != copy.model_dump(include=frozen)
        ):
            findings.append(
                f"ledger entry {entry.dimension} at {entry.hour.isoformat()} was edited (quantity "
                f"{entry.quantity}, written {copy.quantity}): the request written at the hour's close "
                "restored"
            )
            edited[(entry.hour, entry.dimension)] = entry.model_copy(
                update={
                    **{k: getattr(copy, k) for k in frozen},
                    "state": LedgerState.UNKNOWN,
                    "attempts": max(entry.attempts, 1),
                    "answered": 0,
                }
            )
    open_hour = status.open_hour
    recent = saved.open_hour is not None and current - timedelta(hours=1) <= saved.open_hour.start <= current
    if open_hour is None and saved.open_hour is not None and recent:
        open_hour = saved.open_hour
        findings.append(f"the open hour {open_hour.start.isoformat()} was lost: restored from the journal")
    if back:
        names = ", ".join(f"{e.dimension} at {e.hour.isoformat()}" for e in back)
        findings.append(f"{len(back)} live ledger entr(ies) were lost: restored from the journal ({names})")
    if not findings:
        return status, []
    kept = [edited.get((e.hour, e.dimension), e) for e in status.ledger]
    ledger = sorted([*kept, *back], key=lambda e: (e.hour, e.dimension))
    return status.model_copy(update={"open_hour": open_hour, "ledger": ledger}), findings


def restorable(saved: MeteringStatus, now: datetime) -> bool:
    """Whether :func:`restore` could still put anything of ``saved`` back at ``now`` or later.

    A journal for which this is False can never matter again (every live entry is older than
    :data:`RESTORE_HORIZON`, and so far outside AWS's window; the open hour is older than the
    previous hour), so the operator may delete it once its product is gone.
    """
    current = hour_start(ensure_utc(now))
    if saved.open_hour is not None and saved.open_hour.start >= current - timedelta(hours=1):
        return True
    return any(entry.hour >= current - RESTORE_HORIZON for entry in live_entries(saved))


def prune(status: MeteringStatus, policy: Policy) -> MeteringStatus:
    """Keep Pending and Unknown entries, Expired ones not yet taken over, and bounded history.

    Finished entries are kept up to ``history`` per dimension and ``history_bytes`` in all, newest
    first. Live entries are never dropped: they are what the send protocol still needs.
    """
    open_start = status.open_hour.start if status.open_hour else None

    def live(e: LedgerEntry) -> bool:
        if e.state in LIVE:
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
    # Serialising every entry each cycle is most of prune's cost, so it is only done when a cheap
    # upper bound of the size does not already fit.
    kept.sort(key=lambda e: e.hour, reverse=True)
    keep: set[tuple[datetime, str]] = set()
    if sum(_size_bound(e) for e in kept) <= policy.history_bytes:
        keep = {(e.hour, e.dimension) for e in kept}
    used = 0
    for entry in kept if not keep else []:
        used += len(entry.model_dump_json(by_alias=True, exclude_none=True))
        if used > policy.history_bytes:
            break
        keep.add((entry.hour, entry.dimension))
    ledger = [e for e in status.ledger if live(e) or (e.hour, e.dimension) in keep]
    ledger.sort(key=lambda e: (e.hour, e.dimension))
    return status.model_copy(update={"ledger": ledger})


def _size_bound(entry: LedgerEntry) -> int:
    """An upper bound of ``len(entry.model_dump_json(by_alias=True, exclude_none=True))``."""
    fixed = 600  # keys, hour and times, quantity, state, record id, ClientToken, counters, decimal
    # Free text may be escaped in JSON: at most 6 characters (\uXXXX) per character.
    tags = sum(60 + sum(30 + 6 * (len(t.key) + len(t.value)) for t in a.tags) for a in entry.allocations)
    text = 6 * (len(entry.dimension) + len(entry.last_error or ""))
    return fixed + text + 40 * len(entry.carried_from) + tags


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
        (e for e in status.ledger if e.state in LIVE and e.last_error),
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
    unconfirmed = [e for e in status.ledger if e.state is LedgerState.UNCONFIRMED]
    if unconfirmed:
        latest_unconfirmed = max(unconfirmed, key=lambda e: (e.hour, e.dimension))
        note = (
            f"; {len(unconfirmed)} record(s) Unconfirmed (their answer never arrived within the window; "
            f"latest {latest_unconfirmed.dimension} at {latest_unconfirmed.hour.isoformat()})"
        )
    else:
        note = ""
    if dry_run:
        return "True", "DryRun", "dry run: MeterUsage permissions are checked each hour, nothing is billed"
    if status.last_sent_hour is None:
        return "True", "Sampling", f"sampling; the first hour has not been reported yet{note}"
    return (
        "True",
        "Reporting",
        f"usage reported through the hour starting {status.last_sent_hour.isoformat()}{note}",
    )
