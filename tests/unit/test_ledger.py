"""The ledger state machine: hour close, send protocol, retries, expiry carry-over, history."""

from __future__ import annotations

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
    assert L.entry_quantity(replicas, REPLICAS).aws_fields() == {"UsageQuantity": 4}
    # a: (2+4+1)*1200 = 8400, b: 3600 -> 4 * 8400/12000 = 2.8, 4 * 3600/12000 = 1.2 -> 3 + 1
    assert allocations(replicas) == {"a": "3", "b": "1"}
    assert cpu.quantity == Decimal("2.25")
    assert L.entry_quantity(cpu, CPU).aws_fields() == {"UsageQuantityAsDecimal": "2.25"}
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


def test_timestamp_out_of_bounds_carries_immediately() -> None:
    now = H + timedelta(hours=2)
    s = L.tick(first_hour(), now, RULES, POLICY, UID)
    s = L.mark_out_of_window(s, L.find(s, H, "replicas"), "TimestampOutOfBoundsException", RULES)
    assert L.find(s, H, "replicas").state is S.EXPIRED
    assert L.find(s, H, "replicas").carried_into == H + timedelta(hours=2)


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


@settings(max_examples=60, deadline=None)
@given(
    outage=st.lists(st.booleans(), min_size=12, max_size=12),
    replicas=st.lists(st.integers(min_value=0, max_value=50), min_size=12, max_size=12),
)
def test_every_hour_of_usage_is_billed_exactly_once_whatever_the_outages(
    outage: list[bool], replicas: list[int]
) -> None:
    """12 hours (+ 8 quiet ones) of samples and sends every 30 min; AWS down when ``outage``."""
    rules = [REPLICAS]
    s = MeteringStatus()
    sent: dict[datetime, int] = {}
    own: list[int] = []
    for half in range(40):
        now = H + timedelta(minutes=30 * half)
        hour_index = half // 2
        value = replicas[hour_index] if hour_index < 12 else 0
        if half % 2 == 0:
            own.append(value)
        s = L.tick(s, now, rules, POLICY, UID)
        s = L.observe(s, now, {"replicas": sample(value)})
        down = outage[hour_index] if hour_index < 12 else False
        for entry in L.due(s, now, POLICY):
            s = L.claim(s, entry, now)
            if down:
                s = L.mark_transient(s, entry, "InternalServiceErrorException", now, POLICY, rules)
            else:
                assert entry.hour not in sent, "an hour was sent twice"
                sent[entry.hour] = int(entry.quantity)
                s = L.mark_sent(s, entry, f"rec-{entry.hour.isoformat()}", now)
    # every closed hour (0..18; 19 is open) is Sent, or Expired and carried into a Sent one
    assert sum(sent.values()) == sum(own[:19])
    for entry in s.ledger:
        assert entry.state in (S.SENT, S.EXPIRED)
        if entry.state is S.EXPIRED:
            assert entry.carried_into is not None
            assert entry.hour in L.find(s, entry.carried_into, "replicas").carried_from
    if any(outage[:6]) and all(outage[:8]):
        assert any(e.state is S.EXPIRED for e in s.ledger)


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
