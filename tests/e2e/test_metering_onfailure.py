"""spec.metering.onFailure and the DryRun MeterUsage check, end to end.

The operator process, the local API server and the emulator as in test_metering.py (the emulator's
clock is AWS's and the operator's: hours pass when a test sets it) and test_entitlement.py (pods
register with their own IRSA role; the webhook adds the gate). MeterUsage fails the realistic way:
the operator's own key loses ``aws-marketplace:MeterUsage`` in the emulator, so AWS refuses the
dry run (``UnauthorizedException``) and the hourly records (``AccessDeniedException``).
RegisterUsage, made with the pods' roles, keeps working.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from metering_operator.domain.product import ANNOTATION_ENTITLEMENT, GROUP, VERSION, LedgerState
from metering_operator.metering.request import PERMISSION_CHECK_TOKEN_PREFIX
from tests.e2e.conftest import (
    BUYER_ACCOUNT,
    BUYER_ROLE,
    PRODUCT_CODE,
    OperatorFactory,
    OperatorProcess,
    emulator_config,
    wait_for,
)
from tests.e2e.test_entitlement import bare_pod, gated, notes, service_account
from tests.e2e.test_metering import H0, HOUR, KEYS, LEASE, World
from tests.emulator.harness import EmulatorProcess, start_emulator

pytestmark = pytest.mark.cluster

OPERATOR_ARN = f"arn:aws:iam::{BUYER_ACCOUNT}:user/op-a"
APP = "held"


@pytest.fixture
def emulator(cluster: ClusterInfo, tmp_path: Path) -> Iterator[EmulatorProcess]:
    """A product sold hourly per pod (RegisterUsage) and metered on one dimension (MeterUsage)."""
    config = emulator_config(
        cluster,
        products=[
            {
                "productCode": PRODUCT_CODE,
                "publicKeyVersions": [1],
                "dimensions": [{"name": "pods"}],
                "entitledAccounts": [BUYER_ACCOUNT],
            }
        ],
        staticCredentials=[
            {"accessKeyId": KEYS["a"][0], "secretAccessKey": KEYS["a"][1], "arn": OPERATOR_ARN}
        ],
    )
    emu = start_emulator(config, tmp_path / "emulator")
    yield emu
    emu.stop()


@pytest.fixture
def world(kube: client.ApiClient, namespace: str, emulator: EmulatorProcess) -> World:
    return World(kube, namespace, emulator)


def permit_meter_usage(world: World, allowed: bool) -> None:
    """Give the operator's key ``aws-marketplace:MeterUsage``, or take it away (IAM, emulated)."""
    actions = ["aws-marketplace:*"] if allowed else ["aws-marketplace:RegisterUsage"]
    world.emulator.admin.put_static_credentials(
        {
            "accessKeyId": KEYS["a"][0],
            "secretAccessKey": KEYS["a"][1],
            "arn": OPERATOR_ARN,
            "allowedActions": actions,
        }
    )


def start(operator: OperatorFactory, world: World, *args: str) -> OperatorProcess:
    """The operator with its webhook (it adds the gate to new pods) following the emulator's clock;
    ``args``: more flags (test_pins_onfailure.py adds a ``--pin``)."""
    key, secret = KEYS["a"]
    return operator(
        world.namespace,
        world.emulator,
        extra_args=[
            *args,
            "--sample-interval-seconds",
            "1",
            "--emulator-clock-url",
            world.emulator.url,
            "--operator-namespace",
            world.namespace,
            "--operator-identity",
            "op-a",
            "--lease-name",
            LEASE,
            "--lease-duration-seconds",
            "3",
        ],
        extra_env={"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret},
    )


def create_product(world: World, *, mode: str = "Enforce", on_failure: dict[str, Any] | None = None) -> None:
    spec: dict[str, Any] = {
        "productCode": PRODUCT_CODE,
        "publicKeyVersion": 1,
        "publicKey": {"pem": world.emulator.admin.public_key_pem(PRODUCT_CODE, 1)},
        "selector": {"matchLabels": {"app": APP}},
        "entitlement": {"mode": mode},
        "metering": {"dimensions": [{"name": "pods", "source": "ReadyPods", "aggregation": "Maximum"}]},
    }
    if on_failure is not None:
        spec["metering"]["onFailure"] = on_failure
    world.create_product(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": "db"},
            "spec": spec,
        }
    )


def wait_condition(world: World, type_: str, status: str, reason: str | None = None) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        cond = world.condition(type_)
        if cond and cond["status"] == status and (reason is None or cond["reason"] == reason):
            return cond
        return None

    found: dict[str, Any] = wait_for(f"{type_}={status} ({reason})", seen)
    return found


def events(world: World, reason: str, kind: str | None = None) -> list[Any]:
    return [
        e
        for e in client.CoreV1Api(world.apps.api_client).list_namespaced_event(world.namespace).items
        if e.reason == reason and (kind is None or e.involved_object.kind == kind)
    ]


def wait_event(world: World, reason: str, kind: str | None = None) -> Any:
    return wait_for(f"a {reason} Event", lambda: events(world, reason, kind))[0]


def pod(world: World, name: str) -> dict[str, Any]:
    read = world.core.read_namespaced_pod(name, world.namespace)
    return dict(client.ApiClient().sanitize_for_serialization(read))


def new_pod(world: World) -> str:
    return str(bare_pod(world.apps.api_client, world.namespace, app=APP, sa="buyer")["metadata"]["name"])


def wait_released(world: World, name: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_for(
        f"pod {name} granted and released",
        lambda: (
            (p := pod(world, name))
            and not gated(p)
            and notes(p).get(ANNOTATION_ENTITLEMENT) == "Granted"
            and p
        ),
    )
    return found


def metric(op: OperatorProcess, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(op.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_failed_hours(op: OperatorProcess, world: World, count: int) -> None:
    """The gauge is set right after the status write that the test saw: wait for it, do not race it."""
    wait_for(
        f"marketplace_metering_failed_hours == {count}",
        lambda: (
            metric(op, "marketplace_metering_failed_hours", namespace=world.namespace, product="db") == count
        ),
    )


def fail_hour(world: World, hour: datetime) -> None:
    """Close ``hour`` (move the clock past it) and wait until its record was refused."""
    world.set_clock(hour + HOUR)

    def refused() -> bool:
        entry = next((e for e in world.metering().ledger if e.hour == hour), None)
        return (
            entry is not None
            and entry.state is LedgerState.PENDING
            and entry.answered > 0
            and "not authorized to perform: aws-marketplace:MeterUsage" in (entry.last_error or "")
        )

    wait_for(f"the hour {hour.isoformat()} refused", refused)


def dry_runs(world: World) -> list[dict[str, Any]]:
    return [
        e
        for e in world.emulator.admin.events(operation="MeterUsage")
        if (e.get("requestParameters") or {}).get("DryRun") is True
    ]


# ---------------------------------------------------------------------------------------------
# the DryRun check


def test_a_missing_meter_usage_permission_shows_within_seconds_and_clears_when_granted(
    world: World, operator: OperatorFactory
) -> None:
    """No hour closes in this test: the condition comes from the DryRun call at the product's start."""
    world.set_clock(H0 + timedelta(minutes=5))
    permit_meter_usage(world, False)
    service_account(world.apps.api_client, world.namespace, "buyer", BUYER_ROLE)
    start(operator, world)
    create_product(world, mode="Off")
    refused = wait_condition(world, "MeteringPermitted", "False", "AccessDenied")
    assert "UnauthorizedException" in refused["message"]
    assert "pods" in refused["message"]
    calls = dry_runs(world)
    assert calls, "the emulator saw no DryRun MeterUsage"
    assert calls[0]["errorCode"] == "UnauthorizedException"
    assert calls[0]["userIdentity"]["arn"] == OPERATOR_ARN
    assert calls[0]["requestParameters"]["ClientToken"].startswith(PERMISSION_CHECK_TOKEN_PREFIX)
    assert "not authorized" in wait_event(world, "MeteringNotPermitted").message
    assert world.metering().ledger == []  # no hour had closed: this came from the dry run
    assert world.emulator.admin.meter_records(PRODUCT_CODE) == []

    permit_meter_usage(world, True)
    world.set_clock(H0 + timedelta(minutes=16))  # a refused check is repeated every 10 minutes
    permitted = wait_condition(world, "MeteringPermitted", "True", "Permitted")
    assert "pods" in permitted["message"]
    assert wait_event(world, "MeteringPermitted").type == "Normal"
    assert dry_runs(world)[-1]["errorCode"] == "DryRunOperation"
    assert world.emulator.admin.meter_records(PRODUCT_CODE) == []  # a dry run bills nothing


def test_a_customer_not_entitled_is_shown_by_the_dry_run(world: World, operator: OperatorFactory) -> None:
    """Whatever AWS answers the dry run is shown with its own reason (here injected)."""
    world.set_clock(H0 + timedelta(minutes=5))
    world.emulator.admin.set_fault("MeterUsage", fail_with="CustomerNotEntitledException")
    start(operator, world)
    create_product(world, mode="Off")
    refused = wait_condition(world, "MeteringPermitted", "False", "CustomerNotEntitled")
    assert "CustomerNotEntitledException" in refused["message"]


# ---------------------------------------------------------------------------------------------
# onFailure


def test_hold_new_pods_after_two_unreported_hours_then_release_after_the_next_report(
    world: World, operator: OperatorFactory
) -> None:
    """onFailure HoldNewPods, afterHours 2. MeterUsage is refused for H0 and H1: MeteringHealthy
    turns False with an Event and the metric says 2; a pod created then stays gated with the
    reason (never registered), while the pod already running keeps running. Permission comes back
    and H2 is reported: the condition clears with an Event and the held pod is registered and
    released."""
    world.set_clock(H0 + timedelta(minutes=5))
    service_account(world.apps.api_client, world.namespace, "buyer", BUYER_ROLE)
    op = start(operator, world)
    create_product(world, on_failure={"action": "HoldNewPods", "afterHours": 2})
    first = new_pod(world)
    wait_released(world, first)
    wait_condition(world, "MeteringPermitted", "True", "Permitted")
    world.wait_observed(H0, {"pods": "1"})

    permit_meter_usage(world, False)
    fail_hour(world, H0)
    below = wait_condition(world, "MeteringHealthy", "True", "FailingBelowThreshold")
    assert "1 hour(s)" in below["message"]
    fail_hour(world, H0 + HOUR)
    unhealthy = wait_condition(world, "MeteringHealthy", "False", "UsageNotReported")
    assert "2 hour(s) in a row" in unhealthy["message"]
    assert "HoldNewPods" in unhealthy["message"]
    assert "AccessDeniedException" in unhealthy["message"]
    assert "HoldNewPods" in wait_event(world, "UsageNotReported").message
    wait_failed_hours(op, world, 2)

    # The gate has seen the verdict (its Event) before the pod exists: nothing races here.
    assert "HoldNewPods" in wait_event(world, "NewPodsHeld", "MeteredProduct").message
    registrations_before = len(world.emulator.admin.registrations(PRODUCT_CODE))
    second = new_pod(world)
    held_event = wait_event(world, "PodHeld", "Pod")
    assert held_event.involved_object.name == second
    assert "MeteringFailing" in held_event.message
    assert wait_event(world, "PodHeld", "MeteredProduct")
    held = wait_for(
        "the new pod marked held",
        lambda: (p := pod(world, second)) and notes(p).get(ANNOTATION_ENTITLEMENT) == "Pending" and p,
    )
    assert gated(held)
    assert any("MeteringFailing" in v for v in notes(held).values())
    assert len(world.emulator.admin.registrations(PRODUCT_CODE)) == registrations_before  # not registered
    running = pod(world, first)
    assert not gated(running)
    assert running["metadata"].get("deletionTimestamp") is None

    permit_meter_usage(world, True)
    world.set_clock(H0 + 3 * HOUR)  # H2 closes and is reported: one reported hour resets the run
    wait_condition(world, "MeteringHealthy", "True", "Reporting")
    assert wait_event(world, "UsageReportingRecovered").type == "Normal"
    wait_event(world, "NewPodsReleased", "MeteredProduct")
    wait_released(world, second)
    wait_failed_hours(op, world, 0)


def test_report_is_the_default_condition_event_and_metric_but_no_pod_is_held(
    world: World, operator: OperatorFactory
) -> None:
    """No action given (Report), afterHours 1: one refused hour raises the condition, the Event
    and the metric; a new pod is still registered and released."""
    world.set_clock(H0 + timedelta(minutes=5))
    service_account(world.apps.api_client, world.namespace, "buyer", BUYER_ROLE)
    op = start(operator, world)
    create_product(world, on_failure={"afterHours": 1})
    assert world.product()["spec"]["metering"]["onFailure"]["action"] == "Report"
    wait_condition(world, "MeteringPermitted", "True", "Permitted")
    permit_meter_usage(world, False)
    # The next permission check (hourly) is refused too, once an hour has passed.
    fail_hour(world, H0)
    unhealthy = wait_condition(world, "MeteringHealthy", "False", "UsageNotReported")
    assert "pods are not touched" in unhealthy["message"]
    wait_event(world, "UsageNotReported")
    wait_failed_hours(op, world, 1)
    wait_released(world, new_pod(world))
    assert events(world, "PodHeld") == []
    assert events(world, "NewPodsHeld") == []


def test_evict_evicts_the_running_pod_and_holds_the_next_one(world: World, operator: OperatorFactory) -> None:
    """onFailure Evict, afterHours 1: one refused hour, and the running pod is evicted through the
    Eviction API (Events on pod and product); a pod created then is held like under HoldNewPods."""
    world.set_clock(H0 + timedelta(minutes=5))
    service_account(world.apps.api_client, world.namespace, "buyer", BUYER_ROLE)
    start(operator, world)
    create_product(world, on_failure={"action": "Evict", "afterHours": 1})
    first = new_pod(world)
    wait_released(world, first)
    world.wait_observed(H0, {"pods": "1"})
    permit_meter_usage(world, False)
    fail_hour(world, H0)
    wait_condition(world, "MeteringHealthy", "False", "UsageNotReported")
    evicted = wait_event(world, "MeteringFailureEvicted", "Pod")
    assert evicted.involved_object.name == first
    assert "Evict" in evicted.message
    assert wait_event(world, "MeteringFailureEvicted", "MeteredProduct")
    wait_for(
        f"pod {first} gone or terminating",
        lambda: (
            not [
                p
                for p in world.core.list_namespaced_pod(world.namespace, label_selector=f"app={APP}").items
                if p.metadata.name == first and p.metadata.deletion_timestamp is None
            ]
        ),
    )
    second = new_pod(world)
    held = wait_event(world, "PodHeld", "Pod")
    assert held.involved_object.name == second
    assert gated(pod(world, second))
