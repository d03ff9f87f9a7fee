"""The operator, authenticated only as the chart's ServiceAccount, completes the entitlement flow.

SelfSubjectAccessReview (test_rbac.py) proves the rules say what we think; this proves they are
enough for the real code. The chart is installed on the local cluster in the stricter shape
(Roles in one watched namespace), a token is minted for its ServiceAccount, and the operator runs
as a real process (the e2e harness's `operator` factory) with a kubeconfig holding only that
token, against the AWS emulator. A gated 2-replica Deployment must end Granted and ungated, with
one registration per pod in the emulator.

The operator process runs outside the cluster (containers cannot run on the fake nodes), so the
webhook is off and the gate is written into the pod template, as sellers may do; the chart's
webhook wiring is covered by test_render.py and test_install.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from tests.chart.helmcli import Helm
from tests.conftest import temporary_namespace
from tests.e2e.conftest import (  # noqa: F401  (fixtures, registered by importing them)
    BUYER_ROLE,
    PRODUCT_CODE,
    OperatorFactory,
    buyer_emulator,
    metered_product_crd,
    operator,
)
from tests.emulator.harness import EmulatorProcess
from tests.identities import token_kubeconfig

pytestmark = pytest.mark.cluster

GATE = "marketplace.metering.dev/entitlement"
ENTITLEMENT = "marketplace.metering.dev/entitlement"


@pytest.fixture
def product_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-product-") as name:
        yield name


def product_objects(namespace: str, public_key_pem: str) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": "chart-rbac-product"}
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "product-public-key", "namespace": namespace},
            "data": {"public.pem": public_key_pem},
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {
                "name": "product",
                "namespace": namespace,
                "annotations": {"eks.amazonaws.com/role-arn": BUYER_ROLE},
            },
        },
        {
            "apiVersion": "marketplace.metering.dev/v1alpha1",
            "kind": "MeteredProduct",
            "metadata": {"name": "product", "namespace": namespace},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "publicKey": {"configMapKeyRef": {"name": "product-public-key", "key": "public.pem"}},
                "selector": {"matchLabels": labels},
                "entitlement": {"mode": "Enforce", "scope": "Pod"},
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "product", "namespace": namespace},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "product",
                        "schedulingGates": [{"name": GATE}],
                        "containers": [{"name": "app", "image": "example.invalid/product:1"}],
                    },
                },
            },
        },
    ]


def create_all(kube: client.ApiClient, objects: list[dict[str, Any]]) -> None:
    from kubernetes import utils

    custom = client.CustomObjectsApi(kube)
    for obj in objects:
        if obj["kind"] == "MeteredProduct":
            custom.create_namespaced_custom_object(
                "marketplace.metering.dev", "v1alpha1", obj["metadata"]["namespace"], "meteredproducts", obj
            )
        else:
            utils.create_from_dict(kube, obj)


def test_operator_with_chart_service_account_token_grants_pods(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    product_namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    buyer_emulator: EmulatorProcess,  # noqa: F811
    operator: OperatorFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    name = f"mmo-{namespace}"
    values = {
        "fullnameOverride": name,
        "watchNamespaces": [product_namespace],
        "webhook": {"enabled": False},
        "trustedProductCodes": [PRODUCT_CODE],
    }
    try:
        cluster_helm.install(name, namespace, values=values)
        kubeconfig = token_kubeconfig(cluster, kube, namespace, name, tmp_path / "chart-sa.kubeconfig")
        create_all(
            kube, product_objects(product_namespace, buyer_emulator.admin.public_key_pem(PRODUCT_CODE, 1))
        )

        op = operator(
            product_namespace,
            buyer_emulator,
            webhook=False,
            extra_args=["--operator-namespace", namespace, "--trusted-product-code", PRODUCT_CODE],
            extra_env={"KUBECONFIG": str(kubeconfig)},
        )

        core = client.CoreV1Api(kube)
        selector = "app.kubernetes.io/name=chart-rbac-product"

        def granted() -> list[Any] | None:
            pods = core.list_namespaced_pod(product_namespace, label_selector=selector).items
            done = [
                p
                for p in pods
                if (p.metadata.annotations or {}).get(ENTITLEMENT) == "Granted"
                and GATE not in {g.name for g in p.spec.scheduling_gates or []}
            ]
            return done if len(pods) == 2 and len(done) == 2 else None

        deadline = time.monotonic() + 240  # pods come from a shared, possibly busy controller manager
        pods = granted()
        while pods is None:
            if time.monotonic() > deadline:
                raise AssertionError(
                    "pods not granted by the operator running as the chart's ServiceAccount:\n"
                    + op.log()[-6000:]
                )
            time.sleep(0.5)
            pods = granted()

        registrations = buyer_emulator.admin.registrations(PRODUCT_CODE)
        for pod in pods:
            # Registered once, as itself (its own IRSA web identity), with its uid as nonce.
            mine = [r for r in registrations if r["nonce"] == pod.metadata.uid]
            assert len(mine) == 1, registrations
            assert mine[0]["identity"].get("podUid") == pod.metadata.uid, mine
        # Nothing was refused along the way: no RBAC error in the operator's log.
        log = op.log()
        assert "Forbidden" not in log, log[-4000:]
        # The workload summary follows the pod patches.
        apps = client.AppsV1Api(kube)
        deadline = time.monotonic() + 60
        summary = ""
        while not summary.startswith("Granted"):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"Deployment annotation {ENTITLEMENT!r} is {summary!r}:\n{op.log()[-4000:]}"
                )
            time.sleep(0.5)
            annotations = apps.read_namespaced_deployment("product", product_namespace).metadata.annotations
            summary = (annotations or {}).get(ENTITLEMENT, "")
        assert "Forbidden" not in op.log()
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_operator_with_chart_service_account_token_meters_an_hour(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    product_namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    operator: OperatorFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Sampling, the Lease in the operator's namespace, the status ledger and MeterUsage, as the chart's SA.

    2 replicas for the whole hour H0 (Average, Up) -> exactly one record of 2 for H0, marked Sent.
    """
    from metering_operator.domain.product import LedgerState
    from tests.e2e.test_metering import (
        H0,
        HOUR,
        KEYS,
        PLAIN_REPLICAS_DIM,
        World,
        deployment,
        metering_emulator,
        product,
    )

    name = f"mmo-{namespace}"
    values = {"fullnameOverride": name, "watchNamespaces": [product_namespace], "webhook": {"enabled": False}}
    emulator = metering_emulator(cluster, tmp_path / "emulator", ["replicas"])
    try:
        cluster_helm.install(name, namespace, values=values)
        kubeconfig = token_kubeconfig(cluster, kube, namespace, name, tmp_path / "chart-sa.kubeconfig")
        world = World(kube, product_namespace, emulator)
        # Replicas measures the desired count, so the test does not wait on the (shared) scheduler.
        world.create_deployment(deployment("db", 2, "gold"))
        world.set_clock(H0)
        key, secret = KEYS["a"]
        lease = "chart-sa-metering"
        op = operator(
            product_namespace,
            emulator,
            webhook=False,
            extra_args=[
                "--operator-namespace",
                namespace,
                "--sample-interval-seconds",
                "1",
                "--emulator-clock-url",
                emulator.url,
                "--lease-name",
                lease,
                "--lease-duration-seconds",
                "3",
            ],
            extra_env={
                "KUBECONFIG": str(kubeconfig),
                "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret,
            },
        )
        world.create_product(product([PLAIN_REPLICAS_DIM]))
        world.wait_observed(H0, {"replicas": "2"})
        world.set_clock(H0 + HOUR)
        world.wait_entries(H0, LedgerState.SENT, ["replicas"])

        records = world.records()
        assert list(records) == [("replicas", H0)], records
        (record,) = records[("replicas", H0)]
        assert int(record["quantity"]) == 2
        # The Lease lives in the operator's namespace, held by this process.
        held = client.CoordinationV1Api(kube).read_namespaced_lease(lease, namespace)
        assert held.spec.holder_identity
        assert "Forbidden" not in op.log(), op.log()[-4000:]
    finally:
        emulator.stop()
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)
