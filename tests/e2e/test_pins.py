"""Seller pins and spec transitions, tried as the buyer: a namespace user bound to the built-in
``edit`` ClusterRole (plus an explicit Role for MeteredProduct write, which the chart no longer
aggregates into ``edit``), acting with its own ServiceAccount token against the real API server.

Every weakening of issue 10 is either refused by the API server (the message is asserted) or
obeyed only within the pin, and reported: the ``Ready`` condition's reason and message, an Event,
and the metric scraped from the operator's ``/metrics``. An older decoy MeteredProduct with the
pinned product code, in another watched namespace, never takes over: the emulator's MeterUsage
records are the pinned product's usage only. Without pins, the same changes still leave Events
and move the ``Enforced`` condition.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import ANNOTATION_ENTITLEMENT, GROUP, PLURAL, VERSION
from metering_operator.metering.request import PERMISSION_CHECK_TOKEN_PREFIX
from tests.conftest import temporary_namespace
from tests.e2e.conftest import (
    BUYER_ACCOUNT,
    BUYER_ROLE,
    PRODUCT_CODE,
    UNENTITLED_ROLE,
    OperatorFactory,
    OperatorProcess,
    emulator_config,
    wait_for,
)
from tests.e2e.test_entitlement import bare_pod, gated, notes, pods, service_account
from tests.emulator.harness import EmulatorProcess, start_emulator
from tests.identities import token_kubeconfig

pytestmark = pytest.mark.cluster

H0 = datetime(2031, 5, 6, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
OPERATOR_KEYS = ("AKIAPINSOPERATOR0001", "secret-pins")
READY_PODS = {"name": "pods", "source": "ReadyPods", "aggregation": "Average", "rounding": "Up"}


# --- the buyer ---------------------------------------------------------------------------------------


def edit_user(
    cluster: ClusterInfo, kube: client.ApiClient, home: str, namespaces: list[str], path: Path
) -> Any:
    """An ApiClient for ServiceAccount ``home/buyer``, bound to ``edit`` and MeteredProduct write
    in each of ``namespaces`` -- nothing more."""
    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    core.create_namespaced_service_account(home, {"metadata": {"name": "buyer"}})
    subject = [{"kind": "ServiceAccount", "name": "buyer", "namespace": home}]
    for ns in namespaces:
        rbac.create_namespaced_role_binding(
            ns,
            {
                "metadata": {"name": "buyer-edit"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
                "subjects": subject,
            },
        )
        rbac.create_namespaced_role(
            ns,
            {
                "metadata": {"name": "meteredproducts-write"},
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "resources": [PLURAL],
                        "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
                    }
                ],
            },
        )
        rbac.create_namespaced_role_binding(
            ns,
            {
                "metadata": {"name": "buyer-meteredproducts-write"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "meteredproducts-write",
                },
                "subjects": subject,
            },
        )
    return config.new_client_from_config(
        config_file=str(token_kubeconfig(cluster, kube, home, "buyer", path))
    )


class Products:
    """MeteredProduct calls made with one identity (the buyer's, or admin's for reading)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)

    def create(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

    def patch(self, namespace: str, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        return obj

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any]:
        for c in (self.get(namespace, name).get("status") or {}).get("conditions") or []:
            if c["type"] == type_:
                return dict(c)
        return {}

    def wait_condition(
        self, namespace: str, name: str, type_: str, reason: str, contains: str = ""
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            c = self.condition(namespace, name, type_)
            return c if c.get("reason") == reason and contains in c.get("message", "") else None

        return dict(wait_for(f"{namespace}/{name} {type_} reason {reason} ({contains})", probe))


def events(kube: client.ApiClient, namespace: str, name: str, reason: str) -> list[Any]:
    listed = client.CoreV1Api(kube).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},reason={reason}"
    )
    return list(listed.items)


def wait_event(kube: client.ApiClient, namespace: str, name: str, reason: str, contains: str) -> Any:
    def probe() -> Any:
        return next((e for e in events(kube, namespace, name, reason) if contains in (e.message or "")), None)

    return wait_for(f"Event {reason} on {namespace}/{name} saying {contains!r}", probe)


def metric(op: OperatorProcess, name: str, **labels: str) -> float | None:
    """The value of the sample of ``name`` whose labels include ``labels`` (None: no such sample)."""
    for line in op.metrics().splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if not match:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    return None


def wait_metric(op: OperatorProcess, name: str, value: float, **labels: str) -> None:
    wait_for(f"{name}{labels} == {value}", lambda: metric(op, name, **labels) == value)


def refused(call: Any) -> ApiException:
    with pytest.raises(ApiException) as caught:
        call()
    return caught.value


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
def other_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-decoy-") as name:
        yield name


@pytest.fixture
def emulator(cluster: ClusterInfo, tmp_path: Path) -> Iterator[EmulatorProcess]:
    emu = start_emulator(
        emulator_config(
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
                {
                    "accessKeyId": OPERATOR_KEYS[0],
                    "secretAccessKey": OPERATOR_KEYS[1],
                    "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/operator",
                }
            ],
        ),
        tmp_path / "emulator",
    )
    try:
        yield emu
    finally:
        emu.stop()


def product_spec(key_pem: str, app: str, **entitlement: str) -> dict[str, Any]:
    return {
        "productCode": PRODUCT_CODE,
        "publicKeyVersion": 1,
        "publicKey": {"pem": key_pem},
        "selector": {"matchLabels": {"app": app}},
        "entitlement": {"mode": "Enforce", "scope": "Pod", **entitlement},
        "metering": {"dimensions": [READY_PODS]},
    }


def deployment(kube: client.ApiClient, namespace: str, app: str, replicas: int) -> None:
    client.AppsV1Api(kube).create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": app},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": app}},
                "template": {
                    "metadata": {"labels": {"app": app}},
                    "spec": {
                        "serviceAccountName": "buyer-irsa",
                        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    },
                },
            },
        },
    )


def ready_pods(kube: client.ApiClient, namespace: str, app: str) -> int:
    return sum(
        1
        for p in pods(kube, namespace, app)
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (p.get("status") or {}).get("conditions") or []
        )
    )


def start_operator(
    operator: OperatorFactory,
    namespaces: list[str],
    emulator: EmulatorProcess,
    *args: str,
    webhook: bool = True,
) -> OperatorProcess:
    """The operator following the emulator's clock, sampling every second, with its own keys."""
    return operator(
        namespaces,
        emulator,
        webhook=webhook,
        extra_args=[
            *args,
            "--sample-interval-seconds",
            "1",
            "--emulator-clock-url",
            emulator.url,
            "--operator-namespace",
            namespaces[0],
            "--lease-name",
            "mmo-pins-e2e",
            "--lease-duration-seconds",
            "3",
        ],
        extra_env={"AWS_ACCESS_KEY_ID": OPERATOR_KEYS[0], "AWS_SECRET_ACCESS_KEY": OPERATOR_KEYS[1]},
    )


# --- pinned ------------------------------------------------------------------------------------------


def test_buyer_weakenings_of_a_pinned_product_are_refused_or_obeyed_only_within_the_pin(
    cluster: ClusterInfo,
    kube: client.ApiClient,
    namespace: str,
    other_namespace: str,
    operator: OperatorFactory,
    emulator: EmulatorProcess,
    tmp_path: Path,
) -> None:
    shop, other = namespace, other_namespace
    key = emulator.admin.public_key_pem(PRODUCT_CODE, 1)
    buyer = Products(edit_user(cluster, kube, shop, [shop, other], tmp_path / "buyer.kubeconfig"))
    admin = Products(kube)
    for ns in (shop, other):
        service_account(kube, ns, "buyer-irsa", BUYER_ROLE)
    service_account(kube, shop, "freeloader", UNENTITLED_ROLE)
    emulator.admin.set_clock(H0)

    # The decoy is older than the real product and sits in another watched namespace.
    buyer.create(other, "decoy", product_spec(key, "decoy"))
    deployment(kube, other, "decoy", 3)
    time.sleep(1.1)  # creationTimestamp has second resolution: the decoy is clearly older
    buyer.create(shop, "db", product_spec(key, "db"))
    deployment(kube, shop, "db", 2)
    pin = {
        "productCode": PRODUCT_CODE,
        "namespace": shop,
        "name": "db",
        "minMode": "Enforce",
        "scope": "Pod",
        "dimensions": [READY_PODS],
        "publicKey": key,
        "publicKeyVersion": 1,
        "selector": {"matchLabels": {"app": "db"}},
    }
    op = start_operator(operator, [shop, other], emulator, "--pin", json.dumps(pin))

    # The pinned product works; the decoy is not obeyed at all (condition, Event, metric).
    admin.wait_condition(shop, "db", "Ready", "Configured")
    admin.wait_condition(shop, "db", "Enforced", "Enforced")
    decoy_ready = admin.wait_condition(
        other, "decoy", "Ready", "PinnedElsewhere", f"pinned to MeteredProduct {shop}/db"
    )
    assert decoy_ready["status"] == "False"
    admin.wait_condition(
        other, "decoy", "Metering", "DuplicateProductCode", f"pinned to MeteredProduct {shop}/db"
    )
    wait_event(kube, other, "decoy", "PinnedElsewhere", f"pinned to MeteredProduct {shop}/db")
    wait_metric(
        op,
        "marketplace_metering_pin_violations",
        1.0,
        namespace=other,
        product="decoy",
        field="spec.productCode",
    )
    wait_for("2 db pods Ready", lambda: ready_pods(kube, shop, "db") == 2)
    # The decoy's pods are not registered (nor gated: without the operator they would not be either).
    assert all(ANNOTATION_ENTITLEMENT not in notes(p) for p in pods(kube, other, "decoy"))

    # A steady hour H1 starts with the 2 pinned pods Ready.
    emulator.admin.set_clock(H0 + HOUR)

    # 1. Enforce -> Audit: obeyed only within the pin (still Enforce), reported.
    buyer.patch(shop, "db", {"entitlement": {"mode": "Audit"}})
    ready = admin.wait_condition(
        shop, "db", "Ready", "PinViolated", "spec.entitlement.mode is Audit, pinned minimum Enforce"
    )
    assert ready["status"] == "False"
    wait_event(
        kube, shop, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Enforce to Audit"
    )
    wait_event(kube, shop, "db", "PinViolated", "spec.entitlement.mode is Audit, pinned minimum Enforce")
    wait_metric(
        op,
        "marketplace_metering_pin_violations",
        1.0,
        namespace=shop,
        product="db",
        field="spec.entitlement.mode",
    )

    # 2. Audit -> Off: still Enforce. An unentitled pod is gated at admission and stays gated, Denied.
    buyer.patch(shop, "db", {"entitlement": {"mode": "Off"}})
    admin.wait_condition(
        shop, "db", "Ready", "PinViolated", "spec.entitlement.mode is Off, pinned minimum Enforce"
    )
    wait_event(kube, shop, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Audit to Off")
    freeloader = bare_pod(kube, shop, app="db", sa="freeloader")
    assert gated(freeloader), "the webhook gates the pinned product's pods whatever the spec's mode"
    name = freeloader["metadata"]["name"]
    denied = wait_for(
        "the freeloader pod Denied",
        lambda: next(
            (
                p
                for p in pods(kube, shop, "db")
                if p["metadata"]["name"] == name and notes(p).get(ANNOTATION_ENTITLEMENT) == "Denied"
            ),
            None,
        ),
    )
    assert gated(denied)

    # 3. dryRun: true -- billing does not stop.
    buyer.patch(shop, "db", {"metering": {"dryRun": True}})
    admin.wait_condition(shop, "db", "Ready", "PinViolated", "spec.metering.dryRun is true")
    wait_event(kube, shop, "db", "DryRunChanged", "spec.metering.dryRun changed from false to true")
    wait_metric(
        op,
        "marketplace_metering_pin_violations",
        1.0,
        namespace=shop,
        product="db",
        field="spec.metering.dryRun",
    )

    # 4. Scope Pod -> Cluster: each pod still registers itself; no cluster-wide registration happens.
    buyer.patch(shop, "db", {"entitlement": {"scope": "Cluster"}})
    admin.wait_condition(shop, "db", "Ready", "PinViolated", "spec.entitlement.scope is Cluster, pinned Pod")
    wait_event(
        kube, shop, "db", "EntitlementScopeChanged", "spec.entitlement.scope changed from Pod to Cluster"
    )
    wait_metric(
        op,
        "marketplace_metering_pin_violations",
        1.0,
        namespace=shop,
        product="db",
        field="spec.entitlement.scope",
    )

    # 5. Narrow the selector to nothing: the pinned selector still selects the product's pods.
    buyer.patch(shop, "db", {"selector": {"matchLabels": {"app": "nothing"}}})
    admin.wait_condition(shop, "db", "Ready", "PinViolated", "spec.selector is app=nothing, pinned app=db")
    wait_event(kube, shop, "db", "SelectorChanged", "spec.selector changed from app=db to app=nothing")
    wait_metric(
        op, "marketplace_metering_pin_violations", 1.0, namespace=shop, product="db", field="spec.selector"
    )

    # 6. Remove the dimensions (Off needs one, so back to Audit in the same edit): still metered.
    buyer.patch(shop, "db", {"entitlement": {"mode": "Audit"}, "metering": {"dimensions": []}})
    admin.wait_condition(
        shop, "db", "Ready", "PinViolated", "spec.metering.dimensions lacks pinned dimension(s) pods"
    )
    wait_event(kube, shop, "db", "DimensionsChanged", "spec.metering.dimensions changed from pods to (none)")
    wait_metric(
        op,
        "marketplace_metering_pin_violations",
        1.0,
        namespace=shop,
        product="db",
        field="spec.metering.dimensions",
    )
    assert admin.condition(shop, "db", "Enforced")["reason"] == "Enforced", "what is obeyed is the pin"
    assert (admin.get(shop, "db").get("status") or {}).get("registration") is None

    # 7. Product code change: refused by the API server (CEL transition rule).
    error = refused(lambda: buyer.patch(shop, "db", {"productCode": "someothercode"}))
    assert error.status == 422
    assert "productCode is immutable" in str(error.body)

    # The hour closes: MeterUsage is sent for real (not dry-run), for the pinned product's 2 pods
    # only -- the decoy's 3 pods are never billed, though it is older.
    emulator.admin.set_clock(H0 + 2 * HOUR)

    def h1_record() -> list[dict[str, Any]] | None:
        records = emulator.admin.meter_records(PRODUCT_CODE)
        return records if any(r["hour"].startswith("2031-05-06T11:00") for r in records) else None

    records = wait_for("the record of hour H1", h1_record, timeout=120)
    by_hour = {r["hour"][:16]: r for r in records}
    assert by_hour["2031-05-06T11:00"]["dimension"] == "pods"
    assert float(by_hour["2031-05-06T11:00"]["quantity"]) == 2.0
    assert all(float(r["quantity"]) <= 2.0 for r in records), records
    # No hour was sent as a dry run (the DryRun permission check is not a record: its ClientToken
    # says what it is).
    dry_records = [
        e
        for e in emulator.admin.events(operation="MeterUsage", error_code="DryRunOperation")
        if not e["requestParameters"].get("ClientToken", "").startswith(PERMISSION_CHECK_TOKEN_PREFIX)
    ]
    assert not dry_records
    decoy_status = admin.get(other, "decoy").get("status") or {}
    assert not (decoy_status.get("metering") or {}).get("ledger")

    # 8. Deleting the pinned product: reported (Event in its namespace, metric, operator log).
    buyer.custom.delete_namespaced_custom_object(GROUP, VERSION, shop, PLURAL, "db")
    wait_event(kube, shop, "db", "PinnedProductMissing", f"MeteredProduct {shop}/db, pinned by the seller")
    wait_metric(op, "marketplace_metering_pinned_product_missing", 1.0, namespace=shop, product="db")
    assert f"MeteredProduct {shop}/db, pinned by the seller for product code {PRODUCT_CODE}" in op.log()
    # The decoy still does not take over.
    assert admin.condition(other, "decoy", "Ready")["reason"] == "PinnedElsewhere"

    # At start, a missing pinned product is reported too.
    op.stop()
    op.start().wait_ready()
    wait_metric(op, "marketplace_metering_pinned_product_missing", 1.0, namespace=shop, product="db")


# --- unpinned ----------------------------------------------------------------------------------------


def test_without_pins_each_change_still_leaves_an_event_and_a_condition_transition(
    cluster: ClusterInfo,
    kube: client.ApiClient,
    namespace: str,
    operator: OperatorFactory,
    emulator: EmulatorProcess,
    tmp_path: Path,
) -> None:
    key = emulator.admin.public_key_pem(PRODUCT_CODE, 1)
    buyer = Products(edit_user(cluster, kube, namespace, [namespace], tmp_path / "buyer.kubeconfig"))
    admin = Products(kube)
    buyer.create(namespace, "db", product_spec(key, "db"))
    op = start_operator(operator, [namespace], emulator, webhook=False)
    enforced = admin.wait_condition(namespace, "db", "Enforced", "Enforced")
    assert enforced["status"] == "True"

    buyer.patch(namespace, "db", {"entitlement": {"mode": "Audit"}})
    wait_event(
        kube, namespace, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Enforce to Audit"
    )
    audit = admin.wait_condition(namespace, "db", "Enforced", "EntitlementAudit")
    assert audit["status"] == "False"
    assert audit["lastTransitionTime"] >= enforced["lastTransitionTime"]

    buyer.patch(namespace, "db", {"entitlement": {"scope": "Cluster"}})
    wait_event(
        kube, namespace, "db", "EntitlementScopeChanged", "spec.entitlement.scope changed from Pod to Cluster"
    )
    admin.wait_condition(namespace, "db", "Enforced", "EntitlementAudit,ClusterScope")

    buyer.patch(namespace, "db", {"metering": {"dryRun": True}})
    wait_event(kube, namespace, "db", "DryRunChanged", "spec.metering.dryRun changed from false to true")
    admin.wait_condition(namespace, "db", "Enforced", "EntitlementAudit,ClusterScope,DryRun")
    buyer.patch(namespace, "db", {"metering": {"dryRun": False}})
    wait_event(kube, namespace, "db", "DryRunChanged", "spec.metering.dryRun changed from true to false")
    admin.wait_condition(namespace, "db", "Enforced", "EntitlementAudit,ClusterScope")
    buyer.patch(namespace, "db", {"metering": {"onFailure": {"afterHours": 24}}})
    wait_event(
        kube,
        namespace,
        "db",
        "OnFailureChanged",
        "spec.metering.onFailure changed from Report after 3h to Report after 24h",
    )

    buyer.patch(namespace, "db", {"selector": {"matchLabels": {"app": "nothing"}}})
    wait_event(kube, namespace, "db", "SelectorChanged", "spec.selector changed from app=db to app=nothing")

    buyer.patch(namespace, "db", {"entitlement": {"mode": "Off"}})
    wait_event(
        kube, namespace, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Audit to Off"
    )
    admin.wait_condition(namespace, "db", "Enforced", "EntitlementOff")
    assert (
        metric(
            op,
            "marketplace_metering_spec_changes_total",
            namespace=namespace,
            product="db",
            field="spec.entitlement.mode",
            weakens="true",
        )
        == 2.0
    )

    error = refused(lambda: buyer.patch(namespace, "db", {"productCode": "someothercode"}))
    assert error.status == 422
    assert "productCode is immutable" in str(error.body)

    # A change made while the operator is down is reported when it starts (status.observedSpec).
    op.stop()
    buyer.patch(namespace, "db", {"entitlement": {"mode": "Enforce", "scope": "Pod"}})
    op.start().wait_ready()
    wait_event(
        kube, namespace, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Off to Enforce"
    )
    wait_event(
        kube, namespace, "db", "EntitlementScopeChanged", "spec.entitlement.scope changed from Cluster to Pod"
    )
    assert admin.wait_condition(namespace, "db", "Enforced", "Enforced")["status"] == "True"
