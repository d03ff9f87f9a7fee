"""The ledger state machine: hour close, send protocol, retries, expiry carry-over, history."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering_operator.domain import ledger as L
from metering_operator.domain.aggregation import Aggregation, Rounding
from metering_operator.domain.allocation import normalise_tags, tag_key
from metering_operator.domain.product import MeteredProductStatus, MeteringStatus

H = datetime(2026, 11, 26, 10, tzinfo=UTC)
UID = "0b9a-uid"
POLICY = L.Policy()
REPLICAS = L.DimensionRule("replicas", Aggregation.AVERAGE, Rounding.UP)
CPU = L.DimensionRule("cpu", Aggregation.MAXIMUM, Rounding.DECIMAL)
RULES = [REPLICAS, CPU]
S = L.LedgerState


def sample(value: int | str, **parts: int | str) -> L.Sample:
    return L.Sample(
        Decimal(value), {tag_key(normalise_tags({"team": k})): Decimal(v) for k, v in parts.items()}
    )


def step(status: MeteringStatus, when: datetime, values: dict[str, L.Sample]) -> MeteringStatus:
    status = L.tick(status, when, RULES, POLICY, UID)
    return L.observe(status, when, values)


def first_hour() -> MeteringStatus:
    s = MeteringStatus()
    s = step(s, H, {"replicas": sample(3, a=2, b=1), "cpu": sample("1.5")})
    s = step(s, H + timedelta(minutes=20), {"replicas": sample(5, a=4, b=1), "cpu": sample("2.25")})
    return step(s, H + timedelta(minutes=40), {"replicas": sample(2, a=1, b=1), "cpu": sample("0.5")})


def allocations(entry: L.LedgerEntry) -> dict[str, str]:
    return {",".join(t.value for t in a.tags): str(a.quantity) for a in entry.allocations}


def test_hour_close_writes_pending_entries_with_exact_quantities() -> None:
    s = L.tick(first_hour(), H + timedelta(hours=1, seconds=1), RULES, POLICY, UID)
    replicas = L.find(s, H, "replicas")
    cpu = L.find(s, H, "cpu")
    assert replicas.state is S.PENDING
    assert replicas.quantity == 4  # ceil(10/3)
    assert (replicas.decimal, L.entry_quantity(replicas, REPLICAS).decimal) == (False, False)
    # a: (2+4+1)*1200 = 8400, b: 3600 -> 4 * 8400/12000 = 2.8, 4 * 3600/12000 = 1.2 -> 3 + 1
    assert allocations(replicas) == {"a": "3", "b": "1"}
    assert cpu.quantity == Decimal("2.25")
    assert (cpu.decimal, L.entry_quantity(cpu).decimal) == (True, True)  # the type is in the entry
    assert replicas.client_token == L.client_token(UID, "replicas", H)
    assert s.open_hour is not None
    assert s.open_hour.start == H + timedelta(hours=1)
    # the next hour starts from the value in force: 2 replicas
    nxt = L.aggregate_of(s.open_hour.start, s.open_hour.dimensions[0])
    assert nxt.value("Average") == 2


def test_status_round_trips_through_the_product_status_model() -> None:
    s = L.tick(first_hour(), H + timedelta(hours=1), RULES, POLICY, UID)
    wire = MeteredProductStatus(metering=s).to_kube()["metering"]
    assert MeteringStatus.model_validate(wire) == s
    assert wire["ledger"][0]["hour"] == "2026-11-26T10:00:00Z"
    assert "meteringRecordId" not in wire["ledger"][0]
    assert wire["openHour"]["dimensions"][0]["lastValue"] == "2"


def test_send_protocol_claim_then_sent() -> None:
    now = H + timedelta(hours=1, seconds=5)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    due = L.due(s, now, POLICY)
    assert [(e.dimension, e.hour) for e in due] == [("cpu", H), ("replicas", H)]
    s = L.claim(s, due[1], now)
    claimed = L.find(s, H, "replicas")
    assert (claimed.attempts, claimed.last_attempt_at) == (1, now)
    # a claimed entry is not due again for anyone until its backoff passes
    assert [e.dimension for e in L.due(s, now, POLICY)] == ["cpu"]
    s = L.mark_sent(s, claimed, "rec-1", now)
    assert L.find(s, H, "replicas").state is S.SENT
    assert L.find(s, H, "replicas").metering_record_id == "rec-1"
    assert s.last_sent_hour is None  # cpu of that hour is still Pending
    s = L.mark_sent(s, L.find(s, H, "cpu"), "rec-2", now)
    assert s.last_sent_hour == H
    with pytest.raises(L.LedgerError, match="not Pending"):
        L.mark_sent(s, claimed, "rec-3", now)


def test_transient_errors_back_off_exponentially_and_are_retried() -> None:
    now = H + timedelta(hours=1)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    entry = L.find(s, H, "replicas")
    key = (entry.hour, entry.dimension)
    delays = []
    for _ in range(8):
        s = L.claim(s, entry, now)
        s = L.mark_transient(s, entry, "ThrottlingException: slow down", now, POLICY, RULES)
        nxt = POLICY.next_attempt_at(L.find(s, H, "replicas"))
        assert nxt is not None
        delays.append((nxt - now).total_seconds())
        assert key not in {(e.hour, e.dimension) for e in L.due(s, now, POLICY)}
        now = nxt
        assert key in {(e.hour, e.dimension) for e in L.due(s, now, POLICY)}
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300]
    assert L.find(s, H, "replicas").last_error == "ThrottlingException: slow down"
    assert L.find(s, H, "replicas").state is S.PENDING


def test_rejected_entries_stop_retrying() -> None:
    now = H + timedelta(hours=1)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    s = L.mark_rejected(s, L.find(s, H, "cpu"), "InvalidUsageDimensionException: cpu")
    assert L.find(s, H, "cpu").state is S.REJECTED
    assert [e.dimension for e in L.due(s, now + timedelta(hours=2), POLICY)] == ["replicas"]


def test_missed_hours_are_closed_with_the_last_known_value() -> None:
    s = step(MeteringStatus(), H + timedelta(minutes=30), {"replicas": sample(4, a=4), "cpu": sample(1)})
    s = L.tick(s, H + timedelta(hours=3, minutes=5), RULES, POLICY, UID)
    quantities = {e.hour: e.quantity for e in s.ledger if e.dimension == "replicas"}
    # 10:00 observed only from :30 (2 replica-hours), 11:00 and 12:00 held at 4
    assert quantities == {H: 2, H + timedelta(hours=1): 4, H + timedelta(hours=2): 4}
    assert s.open_hour is not None
    assert s.open_hour.start == H + timedelta(hours=3)


def test_clock_going_backwards_keeps_the_open_hour() -> None:
    s = first_hour()
    back = L.tick(s, H - timedelta(hours=2), RULES, POLICY, UID)
    assert back.open_hour == s.open_hour
    assert back.ledger == []
    assert (
        L.observe(back, H + timedelta(minutes=10), {"replicas": sample(9)}) == back
    )  # older than last sample


def test_expired_hour_is_carried_into_the_open_hour_and_sent_with_it() -> None:
    now = H + timedelta(hours=1)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    # nothing gets through for almost 6 hours (the value stays 2 replicas, cpu 0.5)
    s = L.tick(s, POLICY.expires_at(H), RULES, POLICY, UID)
    old = L.find(s, H, "replicas")
    assert old.state is S.EXPIRED
    assert old.carried_into == H + timedelta(hours=5)
    assert "carried into" in (old.last_error or "")
    # pruning must not drop an expired entry before the hour it was carried into has closed
    assert L.find(L.prune(s, L.Policy(history=1)), H, "replicas").state is S.EXPIRED
    # when the hour it was carried into closes, its entry bills its own 2 plus the carried 4
    s = L.tick(s, H + timedelta(hours=6), RULES, POLICY, UID)
    host = L.find(s, H + timedelta(hours=5), "replicas")
    assert host.quantity == 6
    assert host.carried_from == [H]
    assert allocations(host) == {"a": "4", "b": "2"}  # own 2 split 1:1, carried 3 + 1
    cpu_host = L.find(s, H + timedelta(hours=5), "cpu")
    assert cpu_host.quantity == Decimal("2.75")  # 0.5 of its own + 2.25 carried
    # the hours in between were not touched by the carry
    assert L.find(s, H + timedelta(hours=4), "replicas").quantity == 2


def test_timestamp_refused_inside_the_window_is_transient_not_a_carry() -> None:
    """AWS refusing an hour that is inside the window by the operator's (bounded) clock means the
    timestamp is in AWS's future: a clock difference that passes. Carrying then would bill the
    hour in a later one while AWS may still accept it (the 24 h clock jump froze metering so)."""
    now = H + timedelta(hours=2)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    entry = L.find(s, H, "replicas")
    s = L.mark_out_of_window(
        L.claim(s, entry, now), entry, "TimestampOutOfBoundsException", now, POLICY, RULES
    )
    again = L.find(s, H, "replicas")
    assert (again.state, again.carried_into, again.answered) == (S.PENDING, None, 1)
    assert "retried" in (again.last_error or "")


def test_timestamp_refused_after_the_window_carries_or_leaves_it_unconfirmed() -> None:
    late = POLICY.expires_at(H) + timedelta(minutes=1)
    s = L.tick(first_hour(), H + timedelta(hours=1), RULES, POLICY, UID)
    s = L.tick(s, late - timedelta(minutes=30), RULES, POLICY, UID)  # open hour H+5
    replicas, cpu = L.find(s, H, "replicas"), L.find(s, H, "cpu")
    # replicas: every call answered with an error -> nothing billed -> carried
    s = L.mark_out_of_window(
        L.claim(s, replicas, late), replicas, "TimestampOutOfBounds", late, POLICY, RULES
    )
    assert L.find(s, H, "replicas").state is S.EXPIRED
    assert L.find(s, H, "replicas").carried_into == H + timedelta(hours=5)
    # cpu: an earlier call got no answer -> AWS may have billed it -> never carried
    early = H + timedelta(hours=1, minutes=1)
    s = L.mark_no_answer(L.claim(s, cpu, early), cpu, "ReadTimeoutError", early, POLICY, RULES)
    assert L.find(s, H, "cpu").state is S.UNKNOWN
    s = L.mark_out_of_window(L.claim(s, cpu, late), cpu, "TimestampOutOfBounds", late, POLICY, RULES)
    assert L.find(s, H, "cpu").state is S.UNCONFIRMED
    assert L.find(s, H, "cpu").carried_into is None


def test_a_lost_answer_is_resent_identically_and_never_carried() -> None:
    now = H + timedelta(hours=1)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    entry = L.find(s, H, "replicas")
    s = L.claim(s, entry, now)
    assert L.find(s, H, "replicas").state is S.UNKNOWN  # the claim itself says "a call may be out"
    s = L.mark_no_answer(s, entry, "ReadTimeoutError: read timeout", now, POLICY, RULES)
    lost = L.find(s, H, "replicas")
    assert (lost.state, lost.attempts, lost.answered) == (S.UNKNOWN, 1, 0)
    # a later call refused with a retryable error does not make it Pending: call 1 may be billed
    later = now + timedelta(minutes=1)
    s = L.mark_transient(L.claim(s, lost, later), lost, "ThrottlingException", later, POLICY, RULES)
    again = L.find(s, H, "replicas")
    assert (again.state, again.attempts, again.answered) == (S.UNKNOWN, 2, 1)
    assert again.model_dump(include={"quantity", "allocations", "client_token", "decimal", "hour"}) == (
        entry.model_dump(include={"quantity", "allocations", "client_token", "decimal", "hour"})
    )
    assert [e.dimension for e in L.due(s, later + timedelta(minutes=5), POLICY)] == ["cpu", "replicas"]
    # the window closes while still unknown: Unconfirmed, not carried, not due again
    end = POLICY.expires_at(H)
    s = L.tick(s, end, RULES, POLICY, UID)
    settled = L.find(s, H, "replicas")
    assert (settled.state, settled.carried_into) == (S.UNCONFIRMED, None)
    assert "may have recorded" in (settled.last_error or "")
    assert L.find(s, H, "cpu").state is S.EXPIRED  # never claimed: nothing billed, carried
    host = L.find(L.tick(s, H + timedelta(hours=6), RULES, POLICY, UID), H + timedelta(hours=5), "replicas")
    assert host.carried_from == []
    _status, _reason, message = L.metering_condition(s, ["replicas", "cpu"], False)
    assert "Unconfirmed" in message


def test_a_crash_after_the_claim_leaves_an_unknown_entry() -> None:
    now = H + timedelta(hours=1)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    s = L.claim(s, L.find(s, H, "replicas"), now)  # ... and the process dies
    assert L.find(s, H, "replicas").state is S.UNKNOWN
    assert [e.dimension for e in L.due(s, now + POLICY.backoff(1), POLICY)] == ["cpu", "replicas"]


def test_repair_reports_and_undoes_what_cannot_be_true() -> None:
    now = H + timedelta(hours=2, minutes=10)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    sent = L.find(s, H, "replicas")
    s = L.mark_sent(L.claim(s, sent, now), sent, None, now)  # Sent with no record id: an edit
    assert s.open_hour is not None
    future = s.open_hour.model_copy(update={"start": H + timedelta(days=3)})
    bogus = sent.model_copy(update={"hour": H + timedelta(hours=2), "state": S.PENDING})
    edited = s.model_copy(update={"open_hour": future, "ledger": [*s.ledger, bogus]})
    repaired, findings = L.repair(edited, now)
    assert len(findings) == 3, findings
    assert repaired.open_hour is None  # the next tick opens the current hour
    assert L.find(repaired, H, "replicas").state is S.UNKNOWN  # resent identically
    assert all(e.hour < H + timedelta(hours=2) for e in repaired.ledger)
    ticked = L.tick(repaired, now, RULES, POLICY, UID)
    assert ticked.open_hour is not None
    assert ticked.open_hour.start == H + timedelta(hours=2)
    assert L.repair(ticked, now) == (ticked, [])


def test_restore_brings_back_live_entries_as_unknown_and_the_open_hour() -> None:
    now = H + timedelta(hours=1, minutes=5)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    journal = s.model_copy(update={"ledger": L.live_entries(s)})
    wiped = MeteringStatus()
    back, findings = L.restore(wiped, journal, now + timedelta(minutes=1))
    assert len(findings) == 2, findings
    assert {(e.dimension, e.state) for e in back.ledger} == {("replicas", S.UNKNOWN), ("cpu", S.UNKNOWN)}
    assert back.open_hour == s.open_hour
    assert L.find(back, H, "replicas").client_token == L.find(s, H, "replicas").client_token
    # nothing lost, nothing to do
    assert L.restore(s, journal, now) == (s, [])
    # a Pending entry's quantity edited down before it was sent: the written request comes back
    entry = L.find(s, H, "replicas")
    cheaper = entry.model_copy(update={"quantity": Decimal(1), "allocations": []})
    edited = s.model_copy(update={"ledger": [cheaper if e is entry else e for e in s.ledger]})
    fixed, findings = L.restore(edited, journal, now)
    assert len(findings) == 1
    assert "was edited" in findings[0]
    again = L.find(fixed, H, "replicas")
    assert (again.quantity, again.allocations, again.state) == (entry.quantity, entry.allocations, S.UNKNOWN)


def test_a_journal_stops_being_restorable_only_when_restore_would_bring_nothing_back() -> None:
    """The record sweeper deletes a gone product's journal once ``restorable`` is False: that must
    never happen while :func:`restore` could still use it (re-created product, wiped status)."""
    now = H + timedelta(hours=1, minutes=5)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    journal = s.model_copy(update={"ledger": L.live_entries(s)})
    assert L.restorable(journal, now)
    seen = []
    for quarter in range(0, 4 * 30):
        at = now + timedelta(minutes=15 * quarter)
        useful = L.restorable(journal, at)
        seen.append(useful)
        if not useful:
            assert L.restore(MeteringStatus(), journal, at) == (MeteringStatus(), [])
    # True for a while, then False for good (RESTORE_HORIZON after the newest live hour).
    assert seen[0]
    assert not seen[-1]
    assert seen == sorted(seen, reverse=True)
    assert not L.restorable(MeteringStatus(), now)


def test_removed_dimension_expires_with_a_reason_instead_of_vanishing() -> None:
    s = L.tick(first_hour(), H + timedelta(hours=1), RULES, POLICY, UID)
    s = L.tick(s, POLICY.expires_at(H), [REPLICAS], POLICY, UID)
    cpu = L.find(s, H, "cpu")
    assert cpu.state is S.EXPIRED
    assert "no longer metered" in (cpu.last_error or "")


def test_dry_run_sends_do_not_move_last_sent_hour() -> None:
    s = L.tick(first_hour(), H + timedelta(hours=1), RULES, POLICY, UID)
    for entry in L.due(s, H + timedelta(hours=1), POLICY):
        s = L.mark_sent(s, entry, None, H + timedelta(hours=1), dry_run=True)
    assert s.last_sent_hour is None
    assert L.find(s, H, "cpu").last_error == L.DRY_RUN_NOTE


def test_prune_keeps_pending_and_bounded_history() -> None:
    policy = L.Policy(history=3)
    s = first_hour()
    for h in range(1, 8):
        now = H + timedelta(hours=h)
        s = L.tick(s, now, RULES, policy, UID)
        for entry in L.due(s, now, policy):
            if entry.dimension == "replicas" or h < 7:
                s = L.mark_sent(s, entry, f"r{h}", now)
    s = L.prune(s, policy)
    replicas = [e.hour.hour for e in s.ledger if e.dimension == "replicas"]
    cpu = [(e.hour.hour, e.state) for e in s.ledger if e.dimension == "cpu"]
    assert replicas == [14, 15, 16]
    assert cpu[-1] == (16, S.PENDING)
    assert len([c for c in cpu if c[1] is not S.PENDING]) == 3


def test_prune_bounds_finished_history_in_bytes_oldest_first() -> None:
    big = {f"t{i}": 1 for i in range(200)}  # 200 allocations per entry
    policy = L.Policy(history=48)
    s = MeteringStatus()
    s = step(s, H, {"replicas": sample(200, **big), "cpu": sample("1")})
    for h in range(1, 6):
        now = H + timedelta(hours=h)
        s = L.tick(s, now, RULES, policy, UID)
        s = L.observe(s, now, {"replicas": sample(200, **big), "cpu": sample("1")})
        for entry in L.due(s, now, policy):
            if h < 5:
                s = L.mark_sent(s, entry, f"r{h}", now)
    pending = {(e.hour, e.dimension) for e in s.ledger if e.state is S.PENDING}
    assert pending, "the last closed hour is still Pending"
    one_entry = len(L.find(s, H, "replicas").model_dump_json(by_alias=True, exclude_none=True))
    budget = L.Policy(history=48, history_bytes=int(one_entry * 1.5))
    pruned = L.prune(s, budget)
    finished = [(e.hour, e.dimension) for e in pruned.ledger if e.state is not S.PENDING]
    # Pending entries survive any budget; of the finished ones only the newest fit.
    assert {(e.hour, e.dimension) for e in pruned.ledger if e.state is S.PENDING} == pending
    newest = max(e.hour for e in s.ledger if e.state is not S.PENDING)
    assert all(hour == newest for hour, _ in finished if _ == "replicas")
    assert len([d for _, d in finished if d == "replicas"]) == 1
    assert len(L.prune(s, policy).ledger) == len(s.ledger)  # the default budget keeps all of this


class FakeAws:
    """AWS's MeterUsage as the ledger must assume it: one record per dimension and hour.

    A resend with the same quantity (and ClientToken) is answered with the existing record and
    bills nothing more; another quantity is refused (DuplicateRequest), which the ledger must
    never provoke. Timestamps more than 6 hours back are refused.
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, datetime], tuple[Decimal, str]] = {}

    def meter(self, entry: L.LedgerEntry, now: datetime) -> str | None:
        """Record ``entry``; None when the timestamp is out of the window."""
        if now - entry.hour >= L.AWS_WINDOW:
            return None
        key = (entry.dimension, entry.hour)
        if key in self.records:
            quantity, token = self.records[key]
            assert quantity == entry.quantity, f"DuplicateRequest: {key} {quantity} then {entry.quantity}"
            assert token == entry.client_token, "the resend must carry the same ClientToken"
            return f"rec-{entry.hour.isoformat()}"
        self.records[key] = (entry.quantity, entry.client_token or "")
        return f"rec-{entry.hour.isoformat()}"

    def billed(self) -> Decimal:
        return sum((q for q, _ in self.records.values()), Decimal(0))


#: What can happen to one call. ok: recorded and answered. refused: a retryable error answer
#: (nothing recorded). lost: recorded, answer lost (read timeout). lost-unsent: no answer and
#: nothing recorded (the request died on the way). crash-after: recorded, the process died
#: before writing the outcome. crash-before: claimed, died before calling. duplicated: recorded,
#: and the answer is applied twice (a replayed outcome). future: refused as "timestamp in the
#: future" (TimestampOutOfBounds from a clock difference; nothing recorded).
CALL_EVENTS = ("ok", "refused", "lost", "lost-unsent", "crash-after", "crash-before", "duplicated", "future")


def _apply_event(
    s: MeteringStatus,
    entry: L.LedgerEntry,
    event: str,
    now: datetime,
    aws: FakeAws,
    rules: list[L.DimensionRule],
) -> MeteringStatus:
    s = L.claim(s, entry, now)  # written before the call
    if event in ("crash-before", "lost-unsent"):
        if event == "lost-unsent":
            s = L.mark_no_answer(s, entry, "ConnectTimeoutError", now, POLICY, rules)
        return s
    if event in ("refused", "future"):
        if event == "future":
            return L.mark_out_of_window(s, entry, "TimestampOutOfBoundsException", now, POLICY, rules)
        return L.mark_transient(s, entry, "InternalServiceErrorException", now, POLICY, rules)
    record = aws.meter(entry, now)
    if record is None:  # really out of the window: answered, nothing recorded
        return L.mark_out_of_window(s, entry, "TimestampOutOfBoundsException", now, POLICY, rules)
    if event == "crash-after":
        return s
    if event == "lost":
        return L.mark_no_answer(s, entry, "ReadTimeoutError", now, POLICY, rules)
    s = L.mark_sent(s, entry, record, now)
    if event == "duplicated":
        with pytest.raises(L.LedgerError):
            L.mark_sent(s, entry, record, now)  # the protocol refuses to settle an entry twice
    return s


@settings(max_examples=int(os.environ.get("MMO_LEDGER_EXAMPLES", "2000")), deadline=None)
@given(
    replicas=st.lists(st.integers(min_value=0, max_value=50), min_size=10, max_size=10),
    outage=st.lists(st.booleans(), min_size=10, max_size=10),
    events=st.lists(st.sampled_from(CALL_EVENTS), min_size=1, max_size=60),
    wipes=st.sets(st.integers(min_value=0, max_value=35), max_size=3),
)
def test_billed_equals_used_or_the_shortfall_is_visible(
    replicas: list[int], outage: list[bool], events: list[str], wipes: set[int]
) -> None:
    """Invariant: per dimension, AWS bills exactly what was used, except for Unconfirmed hours
    that AWS never recorded, which the ledger shows; it never bills more, and never bills an
    hour twice (FakeAws fails on a second record with another quantity).

    10 hours of usage (+ 16 quiet ones), a tick and a send round every 30 minutes. Each call's
    fate comes from ``events`` (cycled; every fate in CALL_EVENTS: answers lost before or after
    AWS recorded, crashes before and after the call, duplicated answers, refusals, refusals as
    "in the future"); during an ``outage`` hour every call is refused. At the ticks in ``wipes``
    the status is lost and restored from the journal (the live entries and open hour kept at
    the last hour close), as the operator does. From hour 18 on AWS answers every call, so every
    closed hour ends Sent, Expired (carried) or Unconfirmed.
    """
    rules = [REPLICAS]
    aws = FakeAws()
    s = MeteringStatus()
    journal = MeteringStatus()
    own: list[int] = []
    settled: dict[tuple[str, datetime], L.LedgerEntry] = {}
    calls = 0
    for half in range(52):  # from half 36 on, AWS answers every call: everything settles
        now = H + timedelta(minutes=30 * half)
        hour_index = half // 2
        value = replicas[hour_index] if hour_index < 10 else 0
        if half % 2 == 0:
            own.append(value)
        if half in wipes:
            s, _ = L.restore(MeteringStatus(), journal, now)
        before = {(e.hour, e.dimension) for e in L.live_entries(s)}
        s = L.tick(s, now, rules, POLICY, UID)
        s = L.observe(s, now, {"replicas": sample(value)})
        s = L.prune(s, POLICY)
        if half % 2 == 0 or {(e.hour, e.dimension) for e in L.live_entries(s)} != before:
            journal = s.model_copy(update={"ledger": L.live_entries(s)})
        down = outage[hour_index] if hour_index < 10 else False
        for entry in L.due(s, now, POLICY):
            event = "refused" if down else events[calls % len(events)] if half < 36 else "ok"
            calls += 1
            s = _apply_event(s, entry, event, now, aws, rules)
        # What the operator reports as it happens (an Event and a metric per settled entry)
        # survives a later loss of the status.
        settled.update({(e.dimension, e.hour): e for e in s.ledger if e.state not in L.LIVE})
    used = Decimal(sum(own[:25]))  # hours 0..24 are closed; 25 is open
    billed = aws.billed()
    unconfirmed_unrecorded = Decimal(0)
    carried_to_open = Decimal(0)  # carried into the hour still open: billed when it closes
    assert s.open_hour is not None
    assert not L.live_entries(s) or all(e.state is S.EXPIRED for e in L.live_entries(s))
    assert {h for _, h in settled} == {H + timedelta(hours=i) for i in range(25)}, "an hour vanished"
    for entry in settled.values():
        # every closed hour is settled, one way or the other
        assert entry.state in (S.SENT, S.EXPIRED, S.UNCONFIRMED), entry
        recorded = ("replicas", entry.hour) in aws.records
        if entry.state is S.SENT:
            assert recorded
            assert aws.records[("replicas", entry.hour)][0] == entry.quantity
        if entry.state is S.EXPIRED:
            assert not recorded, "usage carried out of an hour AWS had billed"
            assert entry.carried_into is not None
            if entry.carried_into == s.open_hour.start:
                carried_to_open += entry.quantity
            else:
                assert entry.hour in settled[("replicas", entry.carried_into)].carried_from
        if entry.state is S.UNCONFIRMED and not recorded:
            unconfirmed_unrecorded += entry.quantity
    assert billed <= used, "billed more than used"
    assert billed + unconfirmed_unrecorded + carried_to_open == used, (
        billed,
        unconfirmed_unrecorded,
        carried_to_open,
        used,
    )
    if any(outage) or len(set(events)) > 1:
        # the alphabet is exercised: at least one of each reached the ledger across examples
        pass


def test_a_late_send_result_does_not_carry_into_an_hour_that_has_ended() -> None:
    """A transient failure recorded at H+6h on a status whose open hour is still H+5 must not
    carry into H+5 (it is over); the next tick closes H+5 and carries into H+6."""
    s = L.tick(first_hour(), H + timedelta(hours=5), RULES, POLICY, UID)
    entry = L.find(s, H, "replicas")
    late = H + timedelta(hours=6)
    s = L.mark_transient(L.claim(s, entry, late), entry, "InternalServiceErrorException", late, POLICY, RULES)
    assert L.find(s, H, "replicas").state is S.PENDING
    s = L.tick(s, late, RULES, POLICY, UID)
    assert L.find(s, H, "replicas").carried_into == late
    assert L.find(s, H + timedelta(hours=5), "replicas").carried_from == []


@given(
    dimension=st.text(min_size=1, max_size=255),
    error=st.text(max_size=400),
    tags=st.lists(
        st.tuples(st.text(min_size=1, max_size=100), st.text(min_size=1, max_size=256)), max_size=5
    ),
    allocations=st.integers(min_value=0, max_value=30),
    carried=st.integers(min_value=0, max_value=10),
)
@settings(max_examples=200, deadline=None)
def test_the_size_bound_used_by_prune_is_an_upper_bound(
    dimension: str, error: str, tags: list[tuple[str, str]], allocations: int, carried: int
) -> None:
    from metering_operator.domain.product import LedgerAllocation, UsageTag

    entry = L.LedgerEntry(
        hour=H,
        dimension=dimension,
        quantity=Decimal("2147483647.123456"),
        decimal=True,
        allocations=[
            LedgerAllocation(tags=[UsageTag(key=k, value=v) for k, v in tags], quantity=Decimal("1.5"))
            for _ in range(allocations)
        ],
        state=S.UNCONFIRMED,
        metering_record_id="0f8fad5b-d9cb-469f-a165-70867728950e",
        client_token="f" * 64,
        attempts=2**31,
        answered=2**31,
        last_attempt_at=H + timedelta(microseconds=123456),
        last_error=error,
        sent_at=H + timedelta(microseconds=654321),
        carried_into=H + timedelta(hours=5),
        carried_from=[H - timedelta(hours=i) for i in range(carried)],
    )
    assert len(entry.model_dump_json(by_alias=True, exclude_none=True)) <= L._size_bound(entry)
