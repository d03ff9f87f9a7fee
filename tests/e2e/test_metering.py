"""Hourly metering end to end: the operator process, the local cluster and the emulator.

The emulator's clock is the only clock that matters: the operator follows it
(``--emulator-clock-url``), the tests set it, so hours pass in seconds. Sampling runs every
second (``--sample-interval-seconds 1``). The emulator is judged through its admin API: its
meter records are what AWS would bill.

Quantities are computed by hand here. Scaling happens "at known times": the test moves the clock
to the minute, scales, and waits until the operator has seen the new value; the few real
seconds that takes shift usage by less than the rounding rule (``Up``) can notice, which the
hand computation in each test states.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from metering_operator.domain.product import GROUP, PLURAL, VERSION, LedgerState, MeteringStatus
from metering_operator.metering.request import PERMISSION_CHECK_TOKEN_PREFIX
from tests.e2e.conftest import (
    BUYER_ACCOUNT,
    PRODUCT_CODE,
    WAIT,
    OperatorFactory,
    OperatorProcess,
    emulator_config,
    wait_for,
)
from tests.emulator.harness import EmulatorProcess, start_emulator

pytestmark = pytest.mark.cluster

H0 = datetime(2031, 3, 4, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
LEASE = "mmo-metering-e2e"
CLOCK_FOLLOW_SECONDS = 2.5
KEYS = {
    "a": ("AKIAMETERINGOPERATORA", "secret-a"),
    "b": ("AKIAMETERINGOPERATORB", "secret-b"),
    "c": ("AKIAMETERINGOPERATORC", "secret-c"),
}


# ---------------------------------------------------------------------------------------------
# helpers


def metering_emulator(cluster: ClusterInfo, directory: Path, dimensions: list[str]) -> EmulatorProcess:
    config = emulator_config(
        cluster,
        products=[
            {
                "productCode": PRODUCT_CODE,
                "dimensions": [{"name": d} for d in dimensions],
                "entitledAccounts": [BUYER_ACCOUNT],
            }
        ],
        staticCredentials=[
            {
                "accessKeyId": key,
                "secretAccessKey": secret,
                "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/op-{n}",
            }
            for n, (key, secret) in KEYS.items()
        ],
    )
    return start_emulator(config, directory)


@pytest.fixture
def emulator_factory(
    cluster: ClusterInfo, tmp_path: Path
) -> Iterator[Callable[[list[str]], EmulatorProcess]]:
    started: list[EmulatorProcess] = []

    def start(dimensions: list[str]) -> EmulatorProcess:
        emu = metering_emulator(cluster, tmp_path / f"emulator-{len(started)}", dimensions)
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


def start_operator(
    operator: OperatorFactory,
    namespace: str,
    emulator: EmulatorProcess,
    identity: str,
    *,
    env: dict[str, str] | None = None,
    wait: bool = True,
    args: list[str] | None = None,
) -> OperatorProcess:
    key, secret = KEYS[identity]
    return operator(
        namespace,
        emulator,
        webhook=False,
        wait=wait,
        extra_args=[
            "--sample-interval-seconds",
            "1",
            "--emulator-clock-url",
            emulator.url,
            "--operator-namespace",
            namespace,
            "--operator-identity",
            f"op-{identity}",
            "--lease-name",
            LEASE,
            "--lease-duration-seconds",
            "3",
            *(args or []),
        ],
        extra_env={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, **(env or {})},
    )


def deployment(name: str, replicas: int, tier: str, cpu: str = "250m") -> dict[str, Any]:
    labels = {"app": "db", "tier": tier}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "db",
                            "image": "registry.invalid/db:1",
                            "resources": {"requests": {"cpu": cpu}},
                        }
                    ]
                },
            },
        },
    }


def product(dimensions: list[dict[str, Any]], *, dry_run: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": "db"},
        "spec": {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "selector": {"matchLabels": {"app": "db"}},
            "entitlement": {"mode": "Off"},
            "metering": {"dimensions": dimensions, "dryRun": dry_run},
        },
    }


REPLICAS_DIM = {
    "name": "replicas",
    "source": "Replicas",
    "aggregation": "Average",
    "rounding": "Up",
    "allocations": {
        "tags": [{"key": "namespace", "from": "Namespace"}, {"key": "tier", "fromLabel": "tier"}]
    },
}
PLAIN_REPLICAS_DIM = {k: v for k, v in REPLICAS_DIM.items() if k != "allocations"}
VCPU_DIM = {"name": "vcpu", "source": "CPURequests", "aggregation": "Maximum", "rounding": "Decimal"}


class World:
    """The test's handles: API clients, namespace, emulator."""

    def __init__(self, kube: client.ApiClient, namespace: str, emulator: EmulatorProcess) -> None:
        self.apps = client.AppsV1Api(kube)
        self.core = client.CoreV1Api(kube)
        self.custom = client.CustomObjectsApi(kube)
        self.namespace = namespace
        self.emulator = emulator

    # -- cluster ------------------------------------------------------------------------------
    def create_deployment(self, body: dict[str, Any]) -> None:
        self.apps.create_namespaced_deployment(self.namespace, body)

    def scale(self, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": replicas}})

    def bound_pods(self) -> int:
        pods = self.core.list_namespaced_pod(self.namespace, label_selector="app=db").items
        return sum(1 for p in pods if p.spec.node_name and p.metadata.deletion_timestamp is None)

    def wait_bound(self, count: int) -> None:
        wait_for(f"{count} bound pods", lambda: self.bound_pods() == count)

    def create_product(self, body: dict[str, Any]) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def product(self) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, "db"
        )
        return obj

    def metering(self) -> MeteringStatus:
        return MeteringStatus.model_validate((self.product().get("status") or {}).get("metering") or {})

    def condition(self, type_: str = "Metering") -> dict[str, Any] | None:
        for c in (self.product().get("status") or {}).get("conditions") or []:
            if c.get("type") == type_:
                return dict(c)
        return None

    # -- clock --------------------------------------------------------------------------------
    def set_clock(self, when: datetime) -> None:
        self.emulator.admin.set_clock(when)

    def set_clock_and_settle(self, when: datetime) -> None:
        """Set the clock, then give the operator time to re-read it (it does so every second):
        a scale seen before that would be stamped with the old time."""
        self.emulator.admin.set_clock(when)
        time.sleep(CLOCK_FOLLOW_SECONDS)

    def wait_observed(self, hour: datetime, values: dict[str, str]) -> None:
        """Until the operator's open hour is ``hour`` and each dimension last sampled ``values``."""

        def seen() -> bool:
            open_hour = self.metering().open_hour
            if open_hour is None or open_hour.start != hour:
                return False
            last = {d.name: d.last_value for d in open_hour.dimensions}
            return all(last.get(k) == Decimal(v) for k, v in values.items())

        wait_for(f"operator to sample {values} in the hour {hour.isoformat()}", seen)

    def wait_entries(
        self, hour: datetime, state: LedgerState, dimensions: list[str], timeout: float = WAIT
    ) -> None:
        def settled() -> bool:
            ledger = {(e.hour, e.dimension): e.state for e in self.metering().ledger}
            return all(ledger.get((hour, d)) is state for d in dimensions)

        wait_for(f"{dimensions} at {hour.isoformat()} to be {state.value}", settled, timeout)

    # -- emulator -----------------------------------------------------------------------------
    def records(self) -> dict[tuple[str, datetime], list[dict[str, Any]]]:
        by_key: dict[tuple[str, datetime], list[dict[str, Any]]] = {}
        for r in self.emulator.admin.meter_records(PRODUCT_CODE):
            hour = datetime.fromisoformat(r["hour"].replace("Z", "+00:00"))
            by_key.setdefault((r["dimension"], hour), []).append(r)
        return by_key

    def duplicate_errors(self) -> list[dict[str, Any]]:
        return self.emulator.admin.events(operation="MeterUsage", error_code="DuplicateRequestException")


def assert_one_record_each(
    world: World, expected: dict[tuple[str, datetime], str]
) -> dict[tuple[str, datetime], Any]:
    records = world.records()
    assert set(records) == set(expected), f"records for {sorted(records)}, expected {sorted(expected)}"
    for key, quantity in expected.items():
        assert len(records[key]) == 1, f"{key}: {len(records[key])} records"
        assert Decimal(records[key][0]["quantity"]) == Decimal(quantity), f"{key}: {records[key][0]}"
        allocations = records[key][0]["allocations"]
        if allocations:
            total = sum(
                Decimal(str(a.get("AllocatedUsageQuantityAsDecimal", a.get("AllocatedUsageQuantity"))))
                for a in allocations
            )
            assert total == Decimal(quantity), f"{key}: allocations sum to {total}"
    assert world.duplicate_errors() == []
    # The ledger agrees with AWS: each record id is the one the ledger marked Sent.
    ledger = {(e.dimension, e.hour): e for e in world.metering().ledger}
    for key in expected:
        assert ledger[key].state is LedgerState.SENT
        assert ledger[key].metering_record_id == records[key][0]["meteringRecordId"]
    return {k: v[0] for k, v in records.items()}


def allocation_split(record: dict[str, Any]) -> dict[str, int]:
    return {
        next(t["Value"] for t in a["Tags"] if t["Key"] == "tier"): int(a["AllocatedUsageQuantity"])
        for a in record["allocations"]
    }


@pytest.fixture
def world(
    kube: client.ApiClient, namespace: str, emulator_factory: Callable[[list[str]], EmulatorProcess]
) -> World:
    return World(kube, namespace, emulator_factory(["replicas", "vcpu"]))


# ---------------------------------------------------------------------------------------------
# the tests


def test_two_dimensions_over_three_hours_with_scaling(world: World, operator: OperatorFactory) -> None:
    """db (tier gold) scales 3 -> 5 -> 2 in hour 0 and 2 -> 4 in hour 1; db-replica (silver) stays 1.

    replicas (Average, Up):  H0: gold (3+5+2)/3 + silver 1 = 4.33 -> 5;  H1: gold 2 then 4 = 3, + 1 -> 4;
                             H2: 4 + 1 -> 5.  Allocations (largest remainder of the gold:silver usage):
                             H0 3.85:1.15 -> 4/1, H1 3:1, H2 4:1.
    vcpu (Maximum, Decimal, 250m a pod): H0 6 pods -> 1.5, H1 5 pods -> 1.25, H2 -> 1.25.
    (The real seconds between a scale and its first sample shift each average by < 0.01, which
    Up rounding cannot notice except right at an integer: H1's 4 becomes 3.99..., still 4.)
    """
    world.create_deployment(deployment("db", 3, "gold"))
    world.create_deployment(deployment("db-replica", 1, "silver"))
    world.wait_bound(4)
    world.set_clock(H0)
    metrics_text = start_operator(operator, world.namespace, world.emulator, "a")
    world.create_product(product([REPLICAS_DIM, VCPU_DIM]))
    world.wait_observed(H0, {"replicas": "4", "vcpu": "1"})

    world.set_clock_and_settle(H0 + timedelta(minutes=20))
    world.scale("db", 5)
    world.wait_bound(6)
    world.wait_observed(H0, {"replicas": "6", "vcpu": "1.5"})

    world.set_clock_and_settle(H0 + timedelta(minutes=40))
    world.scale("db", 2)
    world.wait_bound(3)
    world.wait_observed(H0, {"replicas": "3", "vcpu": "0.75"})

    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    world.wait_observed(H0 + HOUR, {"replicas": "3"})

    world.set_clock_and_settle(H0 + HOUR + timedelta(minutes=30))
    world.scale("db", 4)
    world.wait_bound(5)
    world.wait_observed(H0 + HOUR, {"replicas": "5", "vcpu": "1.25"})

    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 3 * HOUR)
    world.wait_entries(H0 + 2 * HOUR, LedgerState.SENT, ["replicas", "vcpu"])

    records = assert_one_record_each(
        world,
        {
            ("replicas", H0): "5",
            ("replicas", H0 + HOUR): "4",
            ("replicas", H0 + 2 * HOUR): "5",
            ("vcpu", H0): "1.5",
            ("vcpu", H0 + HOUR): "1.25",
            ("vcpu", H0 + 2 * HOUR): "1.25",
        },
    )
    assert allocation_split(records[("replicas", H0)]) == {"gold": 4, "silver": 1}
    assert allocation_split(records[("replicas", H0 + HOUR)]) == {"gold": 3, "silver": 1}
    assert allocation_split(records[("replicas", H0 + 2 * HOUR)]) == {"gold": 4, "silver": 1}
    for a in records[("replicas", H0)]["allocations"]:
        assert {"Key": "namespace", "Value": world.namespace} in a["Tags"]
    assert records[("vcpu", H0)]["quantityIsDecimal"] is True
    assert world.metering().last_sent_hour == H0 + 2 * HOUR
    # The gauges follow the status write that the test just saw, a moment later.
    sent_gauge = f'ledger_entries{{namespace="{world.namespace}",product="db",state="Sent"}} 6.0'

    def gauges() -> str | None:
        text = metrics_text.metrics()
        return text if sent_gauge in text else None

    exported = wait_for("the ledger gauge", gauges)
    assert f'metered_quantity_total{{dimension="replicas",product_code="{PRODUCT_CODE}"}} 14.0' in exported
    condition = world.condition()
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("True", "Reporting")
    ready = world.condition("Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("True", "Configured")  # entitlement Off: metering decides


def constant_product(world: World, replicas: int = 2) -> None:
    """db at ``replicas`` (250m each) all along: every hour bills replicas and replicas/4 vCPU."""
    world.create_deployment(deployment("db", replicas, "gold"))
    world.wait_bound(replicas)
    world.set_clock(H0)
    world.create_product(product([PLAIN_REPLICAS_DIM, VCPU_DIM]))


def start_during_outage(world: World, operator: OperatorFactory) -> None:
    """2 replicas, MeterUsage failing from the start, the operator sampling H0."""
    constant_product(world)
    world.emulator.admin.set_fault("MeterUsage", fail_with="InternalServiceErrorException")
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2"})


def vcpu(replicas: int) -> str:
    return str(Decimal(replicas) / 4)


@pytest.mark.parametrize("step", ["before-ledger-write", "after-ledger-write", "after-call"])
def test_sigkill_at_each_step_of_the_send_protocol(
    world: World, operator: OperatorFactory, tmp_path: Path, step: str
) -> None:
    """Kill -9 at ``step`` while closing H0; a new process with another AWS identity and lease
    identity finishes the job: exactly one record per dimension-hour, no DuplicateRequest."""
    constant_product(world)
    marker = tmp_path / f"crashed-{step}"
    first = start_operator(
        operator,
        world.namespace,
        world.emulator,
        "a",
        env={"MMO_CRASH_AT": step, "MMO_CRASH_MARKER": str(marker)},
    )
    world.wait_observed(H0, {"replicas": "2", "vcpu": "0.5"})
    world.set_clock(H0 + HOUR)
    wait_for(f"the operator to kill itself at {step}", lambda: not first.alive())
    assert first.process.returncode == -signal.SIGKILL
    assert marker.read_text() == step
    entries = {e.dimension: e.state for e in world.metering().ledger if e.hour == H0}
    if step == "before-ledger-write":
        assert entries == {}
    elif step == "after-ledger-write":
        assert LedgerState.PENDING in entries.values()
    else:  # the claim made before the call says a call may have reached AWS
        assert set(entries.values()) == {LedgerState.UNKNOWN}
    records_before = world.records()
    if step == "after-call":
        assert len(records_before) == 1  # the call that reached AWS before the kill

    start_operator(operator, world.namespace, world.emulator, "b")  # new process, new identities
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    assert_one_record_each(
        world,
        {
            ("replicas", H0): "2",
            ("vcpu", H0): vcpu(2),
            ("replicas", H0 + HOUR): "2",
            ("vcpu", H0 + HOUR): vcpu(2),
        },
    )
    if step == "after-call":
        callers = {r[0]["callerKey"] for r in world.records().values()}
        assert len(callers) == 2  # both identities sent; the resend was answered idempotently


def test_two_replicas_meter_each_hour_once(world: World, operator: OperatorFactory) -> None:
    constant_product(world, replicas=3)
    start_operator(operator, world.namespace, world.emulator, "a")
    start_operator(operator, world.namespace, world.emulator, "b")
    world.wait_observed(H0, {"replicas": "3"})
    for hour in range(1, 4):
        world.set_clock(H0 + hour * HOUR)
        world.wait_entries(H0 + (hour - 1) * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    expected = {}
    for hour in range(3):
        expected[("replicas", H0 + hour * HOUR)] = "3"
        expected[("vcpu", H0 + hour * HOUR)] = vcpu(3)
    assert_one_record_each(world, expected)
    # Not merely deduplicated by AWS: only the leader called MeterUsage, once per dimension-hour
    # (and only the leader made the DryRun permission checks, which record nothing).
    calls = world.emulator.admin.events(operation="MeterUsage")
    records = [c for c in calls if not c["requestParameters"].get("DryRun")]
    assert all(
        c["requestParameters"]["ClientToken"].startswith(PERMISSION_CHECK_TOKEN_PREFIX)
        for c in calls
        if c not in records
    )
    assert len(records) == len(expected)
    assert len({c["userIdentity"]["accessKeyId"] for c in calls}) == 1
    lease = client.CoordinationV1Api(world.apps.api_client).read_namespaced_lease(LEASE, world.namespace)
    assert lease.spec.holder_identity in ("op-a", "op-b")


def test_three_hour_outage_is_sent_late_within_the_window(world: World, operator: OperatorFactory) -> None:
    start_during_outage(world, operator)
    for hour in range(1, 4):
        world.set_clock(H0 + hour * HOUR)
        closed = H0 + (hour - 1) * HOUR

        def failed_once(closed: datetime = closed) -> bool:
            return any(e.hour == closed and e.attempts and e.last_error for e in world.metering().ledger)

        wait_for(f"a failed attempt for {closed.isoformat()}", failed_once)
    condition = world.condition()
    assert condition is not None
    assert (condition["status"], condition["reason"]) == ("False", "SendFailing")
    ready = world.condition("Ready")
    assert ready is not None
    assert ready["status"] == "True"  # an outage is not a configuration fault
    assert world.records() == {}
    world.emulator.admin.clear_faults()
    # past every backoff (at most 5 minutes), still well inside H0's 6-hour window
    world.set_clock(H0 + 3 * HOUR + timedelta(minutes=6))
    for hour in range(3):
        world.wait_entries(H0 + hour * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    expected = {}
    for hour in range(3):
        expected[("replicas", H0 + hour * HOUR)] = "2"
        expected[("vcpu", H0 + hour * HOUR)] = vcpu(2)
    records = assert_one_record_each(world, expected)
    created = datetime.fromisoformat(records[("replicas", H0)]["createdAt"].replace("Z", "+00:00"))
    assert created >= H0 + 3 * HOUR  # sent late, accepted
    assert all(e.attempts > 1 for e in world.metering().ledger if e.hour == H0)


def test_eight_hour_outage_carries_expired_hours_into_later_ones(
    world: World, operator: OperatorFactory
) -> None:
    """2 replicas all along; AWS down from H0 to H8. H0..H2 leave the window at hour+5:50, i.e.
    when the clock jumps to H6, H7, H8, and are carried into those open hours: H6, H7 and H8
    bill 2 + 2 = 4 replicas (and 1 vCPU); H3..H5 bill 2 each, late; H0..H2 bill nothing."""
    start_during_outage(world, operator)
    for hour in range(1, 9):
        world.set_clock(H0 + hour * HOUR)
        world.wait_observed(H0 + hour * HOUR, {"replicas": "2"})
    for hour in range(3):
        world.wait_entries(H0 + hour * HOUR, LedgerState.EXPIRED, ["replicas", "vcpu"])
    world.emulator.admin.clear_faults()
    world.set_clock(H0 + 8 * HOUR + timedelta(minutes=6))
    for hour in range(3, 8):
        world.wait_entries(H0 + hour * HOUR, LedgerState.SENT, ["replicas", "vcpu"])
    world.set_clock(H0 + 9 * HOUR)
    world.wait_entries(H0 + 8 * HOUR, LedgerState.SENT, ["replicas", "vcpu"])

    expected = {}
    for hour in range(3, 9):
        carried = hour >= 6
        expected[("replicas", H0 + hour * HOUR)] = "4" if carried else "2"
        expected[("vcpu", H0 + hour * HOUR)] = "1" if carried else "0.5"
    assert_one_record_each(world, expected)
    ledger = {(e.dimension, e.hour): e for e in world.metering().ledger}
    for hour in range(3):
        expired = ledger[("replicas", H0 + hour * HOUR)]
        assert expired.state is LedgerState.EXPIRED
        assert expired.carried_into == H0 + (hour + 6) * HOUR
        assert ledger[("replicas", H0 + (hour + 6) * HOUR)].carried_from == [H0 + hour * HOUR]
    events = client.CoreV1Api(world.apps.api_client).list_namespaced_event(world.namespace).items
    assert any(e.reason == "MeteringCarried" for e in events)


def test_unknown_dimension_is_rejected_and_named_while_others_continue(
    kube: client.ApiClient,
    namespace: str,
    emulator_factory: Callable[[list[str]], EmulatorProcess],
    operator: OperatorFactory,
) -> None:
    world = World(kube, namespace, emulator_factory(["replicas"]))  # the listing has no "vcpu"
    constant_product(world)
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2", "vcpu": "0.5"})
    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas"])
    world.wait_entries(H0, LedgerState.REJECTED, ["vcpu"])

    def names_vcpu() -> dict[str, Any] | None:
        c = world.condition()
        return c if c and "vcpu" in c["message"] else None

    condition = wait_for("the Metering condition to name vcpu", names_vcpu)
    assert (condition["status"], condition["reason"]) == ("False", "DimensionRejected")
    assert "InvalidUsageDimensionException" in condition["message"]
    # Ready follows: the product does not work as configured. Written by the entitlement side
    # (its only writer), after it sees the Metering condition.
    ready = wait_for(
        "Ready=False/DimensionRejected",
        lambda: (c := world.condition("Ready")) and c["status"] == "False" and c,
    )
    assert ready["reason"] == "DimensionRejected"
    assert "vcpu" in ready["message"]
    events = wait_for(
        "a MeteringRejected event",
        lambda: [
            e
            for e in client.CoreV1Api(kube).list_namespaced_event(namespace).items
            if e.reason == "MeteringRejected"
        ],
    )
    assert "vcpu" in events[0].message
    # the other dimension goes on being reported, and the rejected one is never retried
    world.set_clock(H0 + 2 * HOUR)
    world.wait_entries(H0 + HOUR, LedgerState.SENT, ["replicas"])
    assert set(world.records()) == {("replicas", H0), ("replicas", H0 + HOUR)}
    attempts = {e.hour: e.attempts for e in world.metering().ledger if e.dimension == "vcpu"}
    assert attempts[H0] == 1


def test_dry_run_checks_permissions_and_bills_nothing(world: World, operator: OperatorFactory) -> None:
    world.create_deployment(deployment("db", 1, "gold"))
    world.wait_bound(1)
    world.set_clock(H0)
    world.create_product(product([PLAIN_REPLICAS_DIM], dry_run=True))
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "1"})
    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas"])
    assert world.records() == {}
    # The hour itself went as a dry run (with its ClientToken), not only the permission check.
    dry = world.emulator.admin.events(operation="MeterUsage", error_code="DryRunOperation")
    assert [
        e for e in dry if not e["requestParameters"]["ClientToken"].startswith(PERMISSION_CHECK_TOKEN_PREFIX)
    ]
    condition = world.condition()
    assert condition is not None
    assert condition["reason"] == "DryRun"
    assert world.metering().last_sent_hour is None


def test_a_second_product_with_the_same_code_is_refused_not_double_sent(
    world: World, operator: OperatorFactory
) -> None:
    constant_product(world)
    start_operator(operator, world.namespace, world.emulator, "a")
    world.wait_observed(H0, {"replicas": "2"})
    time.sleep(1.1)  # creationTimestamp has second resolution: make the copy clearly younger
    copy = product([PLAIN_REPLICAS_DIM, VCPU_DIM])
    copy["metadata"]["name"] = "db-copy"
    world.create_product(copy)

    def refused() -> dict[str, Any] | None:
        obj = world.custom.get_namespaced_custom_object(GROUP, VERSION, world.namespace, PLURAL, "db-copy")
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == "Metering" and c["reason"] == "DuplicateProductCode":
                return dict(c)
        return None

    condition = wait_for("db-copy to be refused", refused)
    assert condition["status"] == "False"
    assert f"{world.namespace}/db" in condition["message"]
    world.set_clock(H0 + HOUR)
    world.wait_entries(H0, LedgerState.SENT, ["replicas", "vcpu"])
    assert_one_record_each(world, {("replicas", H0): "2", ("vcpu", H0): vcpu(2)})
    copy_status = world.custom.get_namespaced_custom_object(
        GROUP, VERSION, world.namespace, PLURAL, "db-copy"
    )
    assert not ((copy_status.get("status") or {}).get("metering") or {}).get("ledger")
