"""Metering under lost answers, crashes, clock jumps and edited or lost status, end to end.

The operator process, the local API server and the emulator as in test_metering.py; the
emulator's clock is AWS's clock. Each test computes by hand what AWS must bill and checks the
emulator's records: billing equals usage, or the shortfall is visible (an Unconfirmed ledger
entry and an Event), and never more.

Every product here is ``constant_product``: 2 replicas (250m each) all along, so each hour is
worth 2 replicas and 0.5 vCPU.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from metering_operator.domain.product import GROUP, PLURAL, VERSION, LedgerState
from tests.e2e.conftest import OperatorFactory, OperatorProcess, wait_for
from tests.e2e.test_metering import (
    H0,
    HOUR,
    LEASE,
    PLAIN_REPLICAS_DIM,
    World,
    assert_one_record_each,
    constant_product,
    metering_emulator,
    start_operator,
    vcpu,
)

pytestmark = pytest.mark.cluster

#: The operator's MeterUsage read timeout in these tests, and an answer held back longer.
READ_TIMEOUT = ["--aws-read-timeout-seconds", "1"]
LOST_ANSWER_MS = 2500


@pytest.fixture
def world(kube: client.ApiClient, namespace: str, cluster: ClusterInfo, tmp_path: Path) -> Iterator[World]:
    emulator = metering_emulator(cluster, tmp_path / "emulator", ["replicas", "vcpu"])
    yield World(kube, namespace, emulator)
    emulator.stop()


def events(world: World, reason: str) -> list[Any]:
    return [
        e
        for e in client.CoreV1Api(world.apps.api_client).list_namespaced_event(world.namespace).items
        if e.reason == reason
    ]


def wait_event(world: World, reason: str) -> list[Any]:
    found: list[Any] = wait_for(f"a {reason} event", lambda: events(world, reason))
    return found


def entry(world: World, dimension: str, hour: datetime) -> Any:
    return next((e for e in world.metering().ledger if (e.dimension, e.hour) == (dimension, hour)), None)


def every_hour(first: int, last: int) -> dict[tuple[str, datetime], str]:
    expected: dict[tuple[str, datetime], str] = {}
    for hour in range(first, last + 1):
        expected[("replicas", H0 + hour * HOUR)] = "2"
        expected[("vcpu", H0 + hour * HOUR)] = vcpu(2)
    return expected


def assert_records(world: World, expected: dict[tuple[str, datetime], str]) -> None:
    """Exactly ``expected`` was billed (one record per dimension-hour), and nothing else."""
    records = world.records()
    assert set(records) == set(expected), f"billed {sorted(records)}, expected {sorted(expected)}"
    for key, quantity in expected.items():
        assert len(records[key]) == 1, f"{key}: {len(records[key])} records"
        assert Decimal(records[key][0]["quantity"]) == Decimal(quantity), f"{key}: {records[key][0]}"
    assert world.duplicate_errors() == []


def lease_rounds(op: OperatorProcess, outcome: str) -> float:
    """``lease_rounds_total`` for one outcome, as this operator process exports it."""
    for family in text_string_to_metric_families(op.metrics()):
        for sample in family.samples:
            if sample.name == "marketplace_metering_lease_rounds_total" and sample.labels == {
                "outcome": outcome
            }:
                return float(sample.value)
    return 0.0


def patch_status(world: World, body: dict[str, Any]) -> None:
    world.custom.patch_namespaced_custom_object_status(GROUP, VERSION, world.namespace, PLURAL, "db", body)


def failing_hour_zero(world: World, operator: OperatorFactory) -> None:
    """H0 closed while AWS fails every call: both entries Pending with an error."""
    constant_product(world)
    world.emulator.admin.set_fault("MeterUsage", fail_with="InternalServiceErrorException")
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2", "vcpu": "0.5"})
    world.set_clock(H0 + HOUR)
    wait_for(
        "H0 refused",
        lambda: all(
            (e := entry(world, d, H0)) is not None and e.state is LedgerState.PENDING and e.answered
            for d in ("replicas", "vcpu")
        ),
    )


# ---------------------------------------------------------------------------------------------
# lost answers and crashes after the call


def test_a_lost_answer_then_failures_until_the_window_closes_bills_the_hour_once(
    world: World, operator: OperatorFactory
) -> None:
    """H0's calls are recorded but their answers held back past the operator's 1 s read timeout;
    then every call fails until H0 has left the window. The old ledger carried H0 into H5 (H0
    billed twice). Now H0 is Unknown, resent identically, then Unconfirmed -- not carried:
    H0..H6 are billed once each, 2 replicas and 0.5 vCPU, 14 replica-hours for 14 used."""
    constant_product(world)
    start_operator(operator, world.namespace, world.emulator, "a", args=READ_TIMEOUT)
    world.wait_observed(H0, {"replicas": "2", "vcpu": "0.5"})
    world.emulator.admin.set_fault("MeterUsage", answer_latency_ms=LOST_ANSWER_MS)
    world.set_clock(H0 + HOUR)
    wait_for(
        "H0's answers lost",
        lambda: all(
            (e := entry(world, d, H0)) is not None
            and e.state is LedgerState.UNKNOWN
            and "no answer" in (e.last_error or "")
            for d in ("replicas", "vcpu")
        ),
    )
    assert set(world.records()) == {("replicas", H0), ("vcpu", H0)}  # AWS did record them
    world.emulator.admin.set_fault("MeterUsage", fail_with="InternalServiceErrorException")
    for hour in range(2, 7):
        world.set_clock(H0 + hour * HOUR)
        world.wait_observed(H0 + hour * HOUR, {"replicas": "2"})
    world.wait_entries(H0, LedgerState.UNCONFIRMED, ["replicas", "vcpu"])
    unconfirmed = wait_event(world, "MeteringUnconfirmed")
    assert "may have recorded" in unconfirmed[0].message
    world.emulator.admin.clear_faults()
    world.set_clock(H0 + 6 * HOUR + timedelta(minutes=6))
    for hour in range(1, 6):
        world.wait_entries(H0 + hour * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 7 * HOUR)
    world.wait_entries(H0 + 6 * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    assert_records(world, every_hour(0, 6))
    assert all(not e.carried_from for e in world.metering().ledger)
    assert not events(world, "MeteringCarried")


def test_a_crash_after_the_call_and_six_hours_down_bills_nothing_twice(
    world: World, operator: OperatorFactory, tmp_path: Path
) -> None:
    """Kill -9 right after H0's first call (replicas, recorded); vcpu was claimed but never
    sent. Down until H6. The successor must neither carry H0 (replicas is billed already) nor
    resend it out of the window: both H0 entries end Unconfirmed. Billed: replicas H0..H6,
    vcpu H1..H6; vcpu H0 (0.5) is the visible shortfall."""
    constant_product(world)
    marker = tmp_path / "crashed"
    first = start_operator(
        operator,
        world.namespace,
        world.emulator,
        "a",
        env={"MMO_CRASH_AT": "after-call", "MMO_CRASH_MARKER": str(marker)},
    )
    world.wait_observed(H0, {"replicas": "2", "vcpu": "0.5"})
    world.set_clock(H0 + HOUR)
    wait_for("the operator to kill itself after the call", lambda: not first.alive())
    assert first.process.returncode == -signal.SIGKILL
    assert set(world.records()) == {("replicas", H0)}
    world.set_clock(H0 + 6 * HOUR + timedelta(minutes=1))
    start_operator(operator, world.namespace, world.emulator, "b")
    world.wait_entries(H0, LedgerState.UNCONFIRMED, ["replicas", "vcpu"])
    for hour in range(1, 6):
        world.wait_entries(H0 + hour * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 7 * HOUR)
    world.wait_entries(H0 + 6 * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    expected = every_hour(1, 6)
    expected[("replicas", H0)] = "2"
    assert_records(world, expected)
    shortfall = entry(world, "vcpu", H0)
    assert (shortfall.state, shortfall.quantity) == (LedgerState.UNCONFIRMED, Decimal("0.5"))
    assert len(wait_event(world, "MeteringUnconfirmed")) >= 2


# ---------------------------------------------------------------------------------------------
# clocks


def test_a_leader_clock_jumping_a_day_ahead_closes_no_future_hours(
    world: World, operator: OperatorFactory, tmp_path: Path
) -> None:
    """The leader's own clock jumps +24 h (the emulator's, i.e. AWS's, does not). The old
    operator closed 24 future hours at the last value. Now its clock is held to the reference:
    H0 and H1 are billed once, at 2 replicas, and nothing after."""
    skew = tmp_path / "skew"
    skew.write_text("0")
    constant_product(world)
    proc = start_operator(
        operator, world.namespace, world.emulator, "a", env={"MMO_CLOCK_SKEW_FILE": str(skew)}
    )
    world.wait_observed(H0, {"replicas": "2"})
    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    skew.write_text(str(24 * 3600))
    wait_for(
        "the operator to see its clock a day off",
        lambda: "marketplace_metering_clock_skew_seconds 86" in proc.metrics(),
    )
    wait_for("its warning", lambda: "off the API server's: using the API server's time" in proc.log())
    status = world.metering()
    assert status.open_hour is not None
    assert status.open_hour.start == H0 + HOUR
    assert [e.hour for e in status.ledger if e.hour > H0] == []
    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    assert_records(world, every_hour(0, 1))


def test_a_replica_whose_clock_runs_20s_fast_does_not_take_a_live_lease(
    world: World, operator: OperatorFactory, tmp_path: Path
) -> None:
    """op-b's clock runs 20 s ahead. The old elector compared op-a's renewTime with its own
    clock, saw it 17 s expired, and both led. Judged on the monotonic clock from observed
    renewals, op-b waits: one leader, one caller, no transition."""
    fast = tmp_path / "fast"
    fast.write_text("20")
    constant_product(world)
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2"})
    b = start_operator(operator, world.namespace, world.emulator, "b", env={"MMO_CLOCK_SKEW_FILE": str(fast)})
    wait_for("op-b to see op-a's lease", lambda: "is held by op-a" in b.log())
    for hour in range(1, 3):
        world.set_clock(H0 + hour * HOUR)
        world.wait_entries(H0 + (hour - 1) * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    # op-b looks at the Lease round after round and defers to op-a's live renewals: seven rounds
    # (half a third of the 3 s lease apart) span more than a lease; the old elector took over
    # within one round.
    deferred = lease_rounds(b, "deferred")
    wait_for("op-b to defer for more than a lease", lambda: lease_rounds(b, "deferred") >= deferred + 7)
    lease = client.CoordinationV1Api(world.apps.api_client).read_namespaced_lease(LEASE, world.namespace)
    assert (lease.spec.holder_identity, lease.spec.lease_transitions or 0) == ("op-a", 0)
    assert "acquired lease" not in b.log()
    calls = world.emulator.admin.events(operation="MeterUsage")
    assert {c["userIdentity"]["accessKeyId"] for c in calls} == {"AKIAMETERINGOPERATORA"}
    assert_records(world, every_hour(0, 1))


# ---------------------------------------------------------------------------------------------
# status edited or lost


def test_a_future_open_hour_is_repaired_and_reported(world: World, operator: OperatorFactory) -> None:
    """status.metering.openHour.start set three days ahead froze metering while Metering stayed
    True/Reporting. Now: an Event, reason StatusRepaired, and H0 is billed (2 replicas: the
    hour is counted from the first sample after the repair, seconds after H0 began)."""
    constant_product(world)
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2"})
    future = (H0 + timedelta(days=3)).isoformat().replace("+00:00", "Z")
    patch_status(world, {"status": {"metering": {"openHour": {"start": future}}}})
    repaired = wait_event(world, "MeteringStatusRepaired")
    assert "after the current hour" in repaired[0].message
    condition = wait_for(
        "reason StatusRepaired", lambda: (c := world.condition()) and c["reason"] == "StatusRepaired" and c
    )
    assert "openHour.start" in condition["message"]
    world.wait_observed(H0, {"replicas": "2"})
    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    assert_one_record_each(world, every_hour(0, 0))


def test_a_status_wiped_with_pending_entries_is_restored_and_sent_once(
    world: World, operator: OperatorFactory
) -> None:
    failing_hour_zero(world, operator)
    patch_status(world, {"status": {"metering": None}})
    restored = wait_event(world, "MeteringStatusRepaired")
    assert "restored from the journal" in restored[0].message
    world.wait_entries(H0, LedgerState.UNKNOWN, ["replicas", "vcpu"])  # never carried from here on
    world.emulator.admin.clear_faults()
    world.set_clock(H0 + HOUR + timedelta(minutes=6))  # past every backoff
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    assert_records(world, every_hour(0, 1))


def test_a_product_deleted_and_recreated_keeps_its_pending_entries(
    world: World, operator: OperatorFactory
) -> None:
    failing_hour_zero(world, operator)
    body = world.product()
    world.custom.delete_namespaced_custom_object(GROUP, VERSION, world.namespace, PLURAL, "db")
    wait_for(
        "the product to be gone",
        lambda: (
            not world.custom.list_namespaced_custom_object(GROUP, VERSION, world.namespace, PLURAL)["items"]
        ),
    )
    world.create_product({k: body[k] for k in ("apiVersion", "kind", "spec")} | {"metadata": {"name": "db"}})
    restored = wait_event(world, "MeteringStatusRepaired")
    assert "restored from the journal" in restored[-1].message
    world.emulator.admin.clear_faults()
    world.set_clock(H0 + HOUR + timedelta(minutes=6))
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    assert_records(world, every_hour(0, 0))


def test_removing_a_dimension_sends_its_pending_hours_first(world: World, operator: OperatorFactory) -> None:
    failing_hour_zero(world, operator)
    world.custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        world.namespace,
        PLURAL,
        "db",
        {"spec": {"metering": {"dimensions": [PLAIN_REPLICAS_DIM]}}},
    )
    world.emulator.admin.clear_faults()
    world.set_clock(H0 + HOUR + timedelta(minutes=6))
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas"])
    expected = every_hour(0, 1)
    del expected[("vcpu", H0 + HOUR)]
    assert_records(world, expected)
    assert entry(world, "vcpu", H0 + HOUR) is None
    assert world.records()[("vcpu", H0)][0]["quantityIsDecimal"] is True  # sent as first written
