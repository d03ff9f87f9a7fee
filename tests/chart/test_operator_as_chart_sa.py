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

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import ANNOTATION_PRODUCT, GROUP, MANAGED_BY, MANAGED_BY_LABEL
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
from tests.samples import chart_sa_values, gated_deployment

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
        gated_deployment("product", 2, labels, GATE, namespace),
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
    values = chart_sa_values(name, product_namespace, PRODUCT_CODE)
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


# --- the operator's token turned against the cluster --------------------------------------------

POLICY = "ValidatingAdmissionPolicy"
RBAC = "cannot "  # 'User "system:serviceaccount:..." cannot patch resource ...'
POD_ONLY = "may only remove the scheduling gate marketplace.metering.dev/entitlement"
WORKLOAD_ONLY = "may only write marketplace.metering.dev/* annotations on workloads"
TOKEN_BOUND = "may only mint tokens bound to a Pod"
TOKEN_AUDIENCE = "may only mint tokens for the audience sts.amazonaws.com"
TOKEN_HOUR = "may only mint tokens valid for at most 3600 seconds"
PRODUCT_SPEC = "never changes, creates or deletes a product"
CONFIGMAP_ONLY = "may only delete its own records"
WRONG_SA = "cannot bind token for serviceaccount"  # the API server's own check on pod-bound tokens


def _token(audience: str = "sts.amazonaws.com", seconds: int = 600, pod: Any = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"audiences": [audience], "expirationSeconds": seconds}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod.metadata.name,
            "uid": pod.metadata.uid,
        }
    return {"spec": spec}


def _workload(kind: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    template = {
        "metadata": {"labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }
    spec: dict[str, Any] = {"selector": {"matchLabels": labels}, "template": template}
    if kind == "Deployment":
        spec["replicas"] = 0
    if kind == "StatefulSet":
        spec.update(replicas=0, serviceName=name)
    return {"apiVersion": "apps/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def test_chart_service_account_cannot_be_turned_against_the_cluster(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    product_namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    """With the chart ServiceAccount's own token, every forbidden action is refused by the API
    server, by RBAC (403, not granted) or by the chart's `-operator` admission policy (403, with its
    message); what the operator needs still works. Issue 10: the old RBAC test forbade `update` of
    workloads but allowed `patch`, which has the same power; now a patch of anything but the
    operator's annotations is refused by the policy."""
    from tests.identities import outcome, refused_once_in_force, service_account_client

    name = f"mmo-{namespace}"
    attack = f"k-sys-{namespace}"  # objects placed in kube-system for the attempt, removed afterwards
    values = {
        "fullnameOverride": name,
        "watchNamespaces": [product_namespace],
        "admissionPolicies": {"gate": "policy"},
    }
    admin_core, admin_apps = client.CoreV1Api(kube), client.AppsV1Api(kube)
    try:
        cluster_helm.install(name, namespace, values=values)
        create_all(kube, product_objects(product_namespace, "unused")[1:3])  # the SA and the product
        labels = {"app.kubernetes.io/name": "chart-rbac-product"}
        for ns in (product_namespace, "kube-system"):
            for kind in ("Deployment", "DaemonSet", "StatefulSet"):
                from kubernetes import utils

                utils.create_from_dict(kube, _workload(kind, attack, {"app": attack}), namespace=ns)
        admin_core.create_namespaced_service_account(
            "kube-system",
            {"metadata": {"name": attack, "annotations": {"eks.amazonaws.com/role-arn": BUYER_ROLE}}},
        )
        pod_spec = {
            "serviceAccountName": "product",
            "containers": [{"name": "app", "image": "example.invalid/p:1"}],
        }
        victim = wait_for_gated(
            admin_core,
            product_namespace,
            {"metadata": {"name": "victim", "labels": labels}, "spec": pod_spec},
        )
        wait_for_gated(
            admin_core,
            product_namespace,
            {"metadata": {"name": "allowed", "labels": labels}, "spec": pod_spec},
        )

        # In the release namespace: a ConfigMap that is not the operator's, and one of its records.
        for cm_name, labels_ in (("seller-config", {}), ("mmo-denials-old", {MANAGED_BY_LABEL: MANAGED_BY})):
            admin_core.create_namespaced_config_map(
                namespace, {"metadata": {"name": cm_name, "labels": labels_}, "data": {"k": "v"}}
            )
        api = service_account_client(cluster, kube, namespace, name, tmp_path / "chart-sa.kubeconfig")
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        custom, rbac = client.CustomObjectsApi(api), client.RbacAuthorizationV1Api(api)
        spec_patch = {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {"name": "app", "image": "evil.invalid/miner:1", "command": ["/bin/sh"]}
                        ],
                        "hostNetwork": True,
                    }
                }
            }
        }
        ns, ks = product_namespace, "kube-system"
        attempts: dict[str, tuple[Any, str]] = {
            "patch DaemonSet spec in kube-system": (
                lambda: apps.patch_namespaced_daemon_set(attack, ks, spec_patch),
                RBAC,
            ),
            "patch Deployment spec in kube-system": (
                lambda: apps.patch_namespaced_deployment(attack, ks, spec_patch),
                RBAC,
            ),
            "patch StatefulSet spec in kube-system": (
                lambda: apps.patch_namespaced_stateful_set(attack, ks, spec_patch),
                RBAC,
            ),
            "24h unbound token for a kube-system SA": (
                lambda: core.create_namespaced_service_account_token(attack, ks, _token(seconds=86400)),
                RBAC,
            ),
            "read a Secret": (lambda: core.list_namespaced_secret(ns), RBAC),
            "read the release's Secrets": (lambda: core.list_namespaced_secret(namespace), RBAC),
            "create a pod": (
                lambda: core.create_namespaced_pod(ns, {"metadata": {"name": "x"}, "spec": pod_spec}),
                RBAC,
            ),
            "delete a pod": (lambda: core.delete_namespaced_pod("victim", ns), RBAC),
            "delete all pods": (lambda: core.delete_collection_namespaced_pod(ns), RBAC),
            "update (PUT) a Deployment": (
                lambda: apps.replace_namespaced_deployment(
                    attack, ns, apps.read_namespaced_deployment(attack, ns)
                ),
                RBAC,
            ),
            "scale a Deployment": (
                lambda: apps.patch_namespaced_deployment_scale(attack, ns, {"spec": {"replicas": 5}}),
                RBAC,
            ),
            "create a ClusterRole": (
                lambda: rbac.create_cluster_role({"metadata": {"name": f"{name}-x"}, "rules": []}),
                RBAC,
            ),
            "bind cluster-admin in its namespace": (
                lambda: rbac.create_namespaced_role_binding(
                    ns,
                    {
                        "metadata": {"name": "x"},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "ClusterRole",
                            "name": "cluster-admin",
                        },
                        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
                    },
                ),
                RBAC,
            ),
            "delete its admission policy": (
                lambda: custom.delete_cluster_custom_object(
                    "admissionregistration.k8s.io", "v1", "validatingadmissionpolicies", f"{name}-operator"
                ),
                RBAC,
            ),
            "create a MeteredProduct": (
                lambda: custom.create_namespaced_custom_object(
                    GROUP, "v1alpha1", ns, "meteredproducts", product_objects(ns, "")[2]
                ),
                RBAC,
            ),
            "delete the MeteredProduct": (
                lambda: custom.delete_namespaced_custom_object(
                    GROUP, "v1alpha1", ns, "meteredproducts", "product"
                ),
                RBAC,
            ),
            "patch a node": (
                lambda: core.patch_node(cluster.nodes[0], {"metadata": {"labels": {"x": "y"}}}),
                RBAC,
            ),
            "evict a kube-system pod": (
                lambda: core.create_namespaced_pod_eviction(
                    "kube-apiserver", ks, {"metadata": {"name": "kube-apiserver"}}
                ),
                RBAC,
            ),
            # Granted by RBAC, narrowed by the `-operator` admission policy:
            "patch DaemonSet spec in the product namespace": (
                lambda: apps.patch_namespaced_daemon_set(attack, ns, spec_patch),
                WORKLOAD_ONLY,
            ),
            "patch Deployment spec in the product namespace": (
                lambda: apps.patch_namespaced_deployment(attack, ns, spec_patch),
                WORKLOAD_ONLY,
            ),
            "patch StatefulSet spec in the product namespace": (
                lambda: apps.patch_namespaced_stateful_set(attack, ns, spec_patch),
                WORKLOAD_ONLY,
            ),
            "relabel a Deployment": (
                lambda: apps.patch_namespaced_deployment(
                    attack, ns, {"metadata": {"labels": {"app": "other"}}}
                ),
                WORKLOAD_ONLY,
            ),
            "another annotation on a Deployment": (
                lambda: apps.patch_namespaced_deployment(
                    attack, ns, {"metadata": {"annotations": {"x": "y"}}}
                ),
                WORKLOAD_ONLY,
            ),
            "delete a ConfigMap in its own namespace that is not its record": (
                lambda: core.delete_namespaced_config_map("seller-config", namespace),
                CONFIGMAP_ONLY,
            ),
            "pod image": (
                lambda: core.patch_namespaced_pod(
                    "victim", ns, {"spec": {"containers": [{"name": "app", "image": "evil.invalid/x:1"}]}}
                ),
                POD_ONLY,
            ),
            # A gated pod's scheduling directives are mutable (Kubernetes 1.27+): steering it to a node.
            "pod nodeSelector": (
                lambda: core.patch_namespaced_pod(
                    "victim", ns, {"spec": {"nodeSelector": {"kubernetes.io/hostname": "x"}}}
                ),
                POD_ONLY,
            ),
            "pod activeDeadlineSeconds": (
                lambda: core.patch_namespaced_pod("victim", ns, {"spec": {"activeDeadlineSeconds": 1}}),
                POD_ONLY,
            ),
            "pod labels": (
                lambda: core.patch_namespaced_pod(
                    "victim", ns, {"metadata": {"labels": {"app": "elsewhere"}}}
                ),
                POD_ONLY,
            ),
            "another pod annotation": (
                lambda: core.patch_namespaced_pod("victim", ns, {"metadata": {"annotations": {"x": "y"}}}),
                POD_ONLY,
            ),
            "pod finalizer": (
                lambda: core.patch_namespaced_pod(
                    "victim", ns, {"metadata": {"finalizers": ["example.com/keep"]}}
                ),
                POD_ONLY,
            ),
            "gate removal plus an image": (
                lambda: core.patch_namespaced_pod(
                    "victim",
                    ns,
                    [
                        {"op": "remove", "path": "/spec/schedulingGates"},
                        {"op": "replace", "path": "/spec/containers/0/image", "value": "evil.invalid/x:1"},
                        # The grant, so that the products policy has nothing to say:
                        {
                            "op": "add",
                            "path": "/metadata/annotations",
                            "value": {ENTITLEMENT: "Granted", ANNOTATION_PRODUCT: f"{ns}/product"},
                        },
                    ],
                ),
                POD_ONLY,
            ),
            "switch the product to Audit": (
                lambda: custom.patch_namespaced_custom_object(
                    GROUP,
                    "v1alpha1",
                    ns,
                    "meteredproducts",
                    "product",
                    {"spec": {"entitlement": {"mode": "Audit"}}},
                ),
                PRODUCT_SPEC,
            ),
            "unbound token": (
                lambda: core.create_namespaced_service_account_token("product", ns, _token()),
                TOKEN_BOUND,
            ),
            "pod-bound 24h token": (
                lambda: core.create_namespaced_service_account_token(
                    "product", ns, _token(seconds=86400, pod=victim)
                ),
                TOKEN_HOUR,
            ),
            "pod-bound token, audience of the API server": (
                lambda: core.create_namespaced_service_account_token(
                    "product", ns, _token(cluster.issuer, pod=victim)
                ),
                TOKEN_AUDIENCE,
            ),
            "token for a ServiceAccount no product pod uses": (
                lambda: core.create_namespaced_service_account_token("default", ns, _token(pod=victim)),
                WRONG_SA,
            ),
        }
        # The policies load asynchronously after `helm install`: wait until the operator's is in force.
        # (A new value each time: a patch that changes nothing is no change to refuse.)
        refused_once_in_force(
            lambda: apps.patch_namespaced_deployment(
                attack, ns, {"metadata": {"labels": {"probe": str(time.monotonic_ns())}}}
            ),
            WORKLOAD_ONLY,
        )
        failures = []
        for what, (call, expected) in attempts.items():
            err = outcome(call)
            message = json.loads(err.body)["message"] if err is not None and err.body else str(err)
            if err is None or err.status not in (400, 403) or expected not in message:
                failures.append(
                    f"{what}: expected {expected!r}, got {err.status if err else 'accepted'}: {message[:300]}"
                )
            elif expected not in (RBAC, WRONG_SA):
                assert POLICY in message, message
        assert failures == [], "\n".join(failures)
        assert len(attempts) >= 30

        # What the operator needs still works, with the same token.
        done = core.patch_namespaced_pod(
            "allowed",
            ns,
            [
                {"op": "remove", "path": "/spec/schedulingGates"},
                {
                    "op": "add",
                    "path": "/metadata/annotations",
                    "value": {ENTITLEMENT: "Granted", ANNOTATION_PRODUCT: f"{ns}/product"},
                },
            ],
        )
        assert not done.spec.scheduling_gates
        apps.patch_namespaced_deployment(
            attack, ns, {"metadata": {"annotations": {ENTITLEMENT: "Granted 0/0"}}}
        )
        core.delete_namespaced_config_map("mmo-denials-old", namespace)  # its own record
        assert admin_core.read_namespaced_config_map("seller-config", namespace).data == {"k": "v"}
        token = core.create_namespaced_service_account_token("product", ns, _token(pod=victim))
        assert token.status.token
        api.close()
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)
        for delete in (
            admin_apps.delete_namespaced_deployment,
            admin_apps.delete_namespaced_daemon_set,
            admin_apps.delete_namespaced_stateful_set,
            admin_core.delete_namespaced_service_account,
        ):
            outcome(delete, attack, "kube-system")


def wait_for_gated(core: client.CoreV1Api, namespace: str, body: dict[str, Any]) -> Any:
    """Create a product pod as admin once the chart's MutatingAdmissionPolicy gates it."""
    deadline = time.monotonic() + 60
    while True:
        try:
            created = core.create_namespaced_pod(namespace, body, dry_run="All")
        except ApiException:
            created = None  # refused: the validating policies loaded before the mutating one
        if created is not None and GATE in {g.name for g in created.spec.scheduling_gates or []}:
            return core.create_namespaced_pod(namespace, body)
        if time.monotonic() > deadline:
            raise TimeoutError("the chart's MutatingAdmissionPolicy never gated the pod")
        time.sleep(0.3)
