"""The one place a ledger entry becomes a MeterUsage request, and the typed send protocol."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError, ReadTimeoutError

from metering_operator.aws.errors import MeterUsageDisposition, from_exception, meter_usage_disposition
from metering_operator.domain import ledger as L
from metering_operator.domain.aggregation import Aggregation, Rounding
from metering_operator.domain.allocation import normalise_tags, tag_key
from metering_operator.domain.product import MeteringStatus
from metering_operator.metering import protocol
from metering_operator.metering.request import meter_usage_request

H = datetime(2026, 11, 26, 10, tzinfo=UTC)
REPLICAS = L.DimensionRule("replicas", Aggregation.AVERAGE, Rounding.UP)
CPU = L.DimensionRule("cpu", Aggregation.MAXIMUM, Rounding.DECIMAL)
POLICY = L.Policy()


def closed() -> MeteringStatus:
    parts = {
        tag_key(normalise_tags({"team": "a"})): Decimal(2),
        tag_key(normalise_tags({"team": "b"})): Decimal(1),
    }
    s = L.tick(MeteringStatus(), H, [REPLICAS, CPU], POLICY, "uid")
    s = L.observe(s, H, {"replicas": L.Sample(Decimal(3), parts), "cpu": L.Sample(Decimal(2), {})})
    return L.tick(s, H + timedelta(hours=1), [REPLICAS, CPU], POLICY, "uid")


def test_integer_and_decimal_entries_on_the_wire() -> None:
    s = closed()
    replicas = meter_usage_request("code", L.find(s, H, "replicas")).to_boto()
    assert replicas["UsageQuantity"] == 3
    assert "UsageQuantityAsDecimal" not in replicas
    assert sorted(
        (a["Tags"][0]["Value"], a["AllocatedUsageQuantity"]) for a in replicas["UsageAllocations"]
    ) == [
        ("a", 2),
        ("b", 1),
    ]
    assert replicas["ClientToken"] == L.client_token("uid", "replicas", H)
    # a whole number in a Decimal dimension stays decimal: the type is frozen in the entry
    cpu = meter_usage_request("code", L.find(s, H, "cpu")).to_boto()
    assert Decimal(cpu["UsageQuantityAsDecimal"]) == 2
    assert "UsageQuantity" not in cpu
    assert meter_usage_request("code", L.find(s, H, "cpu"), dry_run=True).to_boto()["DryRun"] is True


def test_every_resend_is_the_identical_request() -> None:
    s = closed()
    entry = L.find(s, H, "cpu")
    first = meter_usage_request("code", entry).to_boto()
    now = H + timedelta(hours=1)
    for _ in range(3):
        s = L.mark_no_answer(L.claim(s, entry, now), entry, "ReadTimeoutError", now, POLICY, [CPU])
        now += timedelta(minutes=5)
    again = L.find(s, H, "cpu")
    assert again.state is L.LedgerState.UNKNOWN
    # the dimension was since removed from the spec: no rule, still the same request
    assert meter_usage_request("code", again, rule=None).to_boto() == first


def test_what_counts_as_an_answer() -> None:
    read = from_exception("MeterUsage", ReadTimeoutError(endpoint_url="http://x"))
    assert (read.answered, meter_usage_disposition(read)) == (False, MeterUsageDisposition.NO_ANSWER)
    for never_sent in (
        ConnectTimeoutError(endpoint_url="http://x"),
        EndpointConnectionError(endpoint_url="http://x"),
    ):
        error = from_exception("MeterUsage", never_sent)
        assert (error.answered, meter_usage_disposition(error)) == (True, MeterUsageDisposition.RETRY)


def test_each_outcome_maps_to_its_transition() -> None:
    s = closed()
    entry = L.find(s, H, "replicas")
    now = H + timedelta(hours=1)
    claimed = L.claim(s, entry, now)
    rules = [REPLICAS, CPU]

    def after(outcome: protocol.Outcome) -> L.LedgerEntry:
        return L.find(protocol.transition(outcome, entry, POLICY, rules)(claimed, now), H, "replicas")

    assert after(protocol.Accepted("rec", False)).state is L.LedgerState.SENT
    assert after(protocol.NoAnswer("ReadTimeoutError")).state is L.LedgerState.UNKNOWN
    assert after(protocol.Refused("Throttling", MeterUsageDisposition.RETRY)).state is L.LedgerState.PENDING
    assert after(protocol.Refused("Dup", MeterUsageDisposition.FINAL)).state is L.LedgerState.REJECTED
    window = after(protocol.Refused("TimestampOutOfBounds", MeterUsageDisposition.OUT_OF_WINDOW))
    assert (window.state, window.carried_into) == (L.LedgerState.PENDING, None)  # inside the window: retried
