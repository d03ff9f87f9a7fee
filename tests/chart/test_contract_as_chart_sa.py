"""A contract product served by an operator that has only the chart's RBAC and IAM policies.

The chart is installed (Roles in one watched namespace, its admission policies bound to its
ServiceAccount), the operator runs as a real process with a kubeconfig holding only a token of
that ServiceAccount, and the emulator's IAM allows each role exactly the actions of the chart's
policy files: the product pods' role `files/iam/license-manager.json`, the operator's own
identity the same file (it checks the `perCluster` entitlement out). The contract has 2 floating
seats; a 3-replica Deployment must end with 2 pods granted and 1 waiting with the reason, the
operator's seat record written in its own namespace, and a scale-down must check a seat in and
hand it to the waiting pod. No Kubernetes call is forbidden and no AWS call is denied along the
way: the chart's RBAC and its IAM documentation cover the License Manager flow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from metering_operator.aws.license_models import MARKETPLACE_KEY_FINGERPRINT
from metering_operator.domain.product import ANNOTATION_ENTITLEMENT, GROUP, PLURAL, SCHEDULING_GATE, VERSION
from metering_operator.kube.seat_records import SEATS_COMPONENT_NAME
from tests.chart.helmcli import CHART, Helm
from tests.conftest import temporary_namespace
from tests.e2e.conftest import (  # noqa: F401  (fixtures, registered by importing them)
    BUYER_ACCOUNT,
    BUYER_ROLE,
    PRODUCT_CODE,
    OperatorFactory,
    emulator_config,
    metered_product_crd,
    operator,
)
from tests.emulator.harness import EmulatorProcess, start_emulator
from tests.identities import token_kubeconfig
from tests.samples import chart_sa_values, gated_deployment

pytestmark = pytest.mark.cluster

T = TypeVar("T")
LICENSE_ARN = f"arn:aws:license-manager::{BUYER_ACCOUNT}:license:l-chartcontract0001"
SKU = "prod-chartcontract01"
APP = "chart-contract"
REASON = "marketplace.metering.dev/reason"
OPERATOR_KEY = ("AKIACHARTCONTRACTOP1", "chart-contract-operator-secret")


def policy_actions(name: str) -> list[str]:
    policy = json.loads((CHART / "files" / "iam" / name).read_text())
    return [action for statement in policy["Statement"] for action in statement["Action"]]


@pytest.fixture
def product_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-contract-") as name:
        yield name


@pytest.fixture
def iam_emulator(cluster: ClusterInfo, tmp_path: Path) -> Iterator[EmulatorProcess]:
    actions = policy_actions("license-manager.json")
    trust = [{"issuer": cluster.issuer, "subjects": ["system:serviceaccount:*"]}]
    config = emulator_config(
        cluster,
        roles=[{"arn": BUYER_ROLE, "trust": trust, "allowedActions": actions}],
        staticCredentials=[
            {
                "accessKeyId": OPERATOR_KEY[0],
                "secretAccessKey": OPERATOR_KEY[1],
                "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/metering-operator",
                "allowedActions": actions,
            }
        ],
        licenses=[
            {
                "licenseArn": LICENSE_ARN,
                "productSKU": SKU,
                "buyerAccount": BUYER_ACCOUNT,
                "entitlements": [
                    {"name": "seats", "unit": "Count", "maxCount": 2},
                    {"name": "site", "unit": "None"},
                ],
            }
        ],
    )
    emulator = start_emulator(config, tmp_path / "emulator")
    try:
        yield emulator
    finally:
        emulator.stop()


def wait(what: str, probe: Callable[[], T | None], log: Callable[[], str], timeout: float = 240) -> T:
    # Pods come from a shared, possibly busy controller manager: a generous bound, never a speed claim.
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{log()[-6000:]}")
        time.sleep(0.5)


def test_chart_rbac_and_iam_policies_serve_a_contract_product(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    product_namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    iam_emulator: EmulatorProcess,
    operator: OperatorFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    name = f"mmo-{namespace}"
    values = chart_sa_values(name, product_namespace, PRODUCT_CODE)
    labels = {"app.kubernetes.io/name": APP}
    core = client.CoreV1Api(kube)
    try:
        cluster_helm.install(name, namespace, values=values)
        kubeconfig = token_kubeconfig(cluster, kube, namespace, name, tmp_path / "chart-sa.kubeconfig")
        core.create_namespaced_service_account(
            product_namespace,
            {"metadata": {"name": "product", "annotations": {"eks.amazonaws.com/role-arn": BUYER_ROLE}}},
        )
        core.create_namespaced_config_map(
            product_namespace,
            {
                "metadata": {"name": "issuer-key"},
                "data": {
                    "issuer.pem": iam_emulator.admin.license_issuer_key_pem(MARKETPLACE_KEY_FINGERPRINT)
                },
            },
        )
        client.CustomObjectsApi(kube).create_namespaced_custom_object(
            GROUP,
            VERSION,
            product_namespace,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "MeteredProduct",
                "metadata": {"name": APP},
                "spec": {
                    "productCode": PRODUCT_CODE,
                    "publicKeyVersion": 1,
                    "selector": {"matchLabels": labels},
                    "entitlement": {
                        "mode": "Enforce",
                        "scope": "Pod",
                        "source": "LicenseManager",
                        "licenseManager": {
                            "productSKU": SKU,
                            "entitlements": [
                                {"name": "seats", "unit": "Count", "perPod": 1},
                                {"name": "site", "unit": "None", "perCluster": 1},
                            ],
                            "issuerPublicKey": {
                                "configMapKeyRef": {"name": "issuer-key", "key": "issuer.pem"}
                            },
                        },
                    },
                },
            },
        )
        op = operator(
            product_namespace,
            iam_emulator,
            webhook=False,
            extra_args=["--operator-namespace", namespace, "--trusted-product-code", PRODUCT_CODE],
            extra_env={
                "KUBECONFIG": str(kubeconfig),
                "AWS_ACCESS_KEY_ID": OPERATOR_KEY[0],
                "AWS_SECRET_ACCESS_KEY": OPERATOR_KEY[1],
            },
        )
        client.AppsV1Api(kube).create_namespaced_deployment(
            product_namespace,
            # The webhook is off (the operator runs outside the cluster); the chart's
            # MutatingAdmissionPolicy would add the gate too.
            gated_deployment(APP, 3, labels, SCHEDULING_GATE),
        )

        def split(total: int, granted: int) -> tuple[list[Any], list[Any]] | None:
            pods = [
                p
                for p in core.list_namespaced_pod(
                    product_namespace, label_selector=f"app.kubernetes.io/name={APP}"
                ).items
                if p.metadata.deletion_timestamp is None
            ]
            done = [
                p
                for p in pods
                if (p.metadata.annotations or {}).get(ANNOTATION_ENTITLEMENT) == "Granted"
                and not p.spec.scheduling_gates
            ]
            waiting = [
                p
                for p in pods
                if p.spec.scheduling_gates
                and (p.metadata.annotations or {}).get(REASON, "").startswith("SeatsExhausted")
            ]
            if len(pods) == total and len(done) == granted and len(waiting) == total - granted:
                return done, waiting
            return None

        granted, _ = wait("2 pods granted and 1 waiting for a seat", lambda: split(3, 2), op.log)
        # Each granted pod's seat was checked out as the pod itself (the pods' role), the site
        # feature once as the operator (its own identity), and the grants are in the operator's
        # seat record in its own namespace.
        checkouts = [c for c in iam_emulator.admin.license_checkouts(LICENSE_ARN) if c["state"] == "Active"]
        by_pod = {c.get("podUid") for c in checkouts if c.get("podUid")}
        assert {p.metadata.uid for p in granted} <= by_pod, checkouts
        assert any(c.get("podUid") is None for c in checkouts), "the perCluster checkout, as the operator"
        records = core.list_namespaced_config_map(
            namespace, label_selector=f"app.kubernetes.io/component={SEATS_COMPONENT_NAME}"
        ).items
        assert len(records) == 1, records
        assert {p.metadata.uid for p in granted} <= set(records[0].data or {}), records[0].data

        # Scale down: the ReplicaSet removes the waiting pod first, then a granted one, whose seat
        # is checked in; then scale back up and the new pod gets that seat.
        client.AppsV1Api(kube).patch_namespaced_deployment_scale(
            APP, product_namespace, {"spec": {"replicas": 1}}
        )
        wait(
            "a seat checked in",
            lambda: [
                c for c in iam_emulator.admin.license_checkouts(LICENSE_ARN) if c["state"] == "CheckedIn"
            ],
            op.log,
        )
        client.AppsV1Api(kube).patch_namespaced_deployment_scale(
            APP, product_namespace, {"spec": {"replicas": 2}}
        )
        wait("2 pods granted after the seat came back", lambda: split(2, 2), op.log)

        denied = [e for e in iam_emulator.admin.events() if e.get("errorCode") == "AccessDeniedException"]
        assert denied == [], f"the chart's IAM policy files were not enough: {denied}"
        assert "Forbidden" not in op.log(), op.log()[-4000:]
        assert "may only mint tokens" not in op.log(), "an admission policy refused the operator"
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)
