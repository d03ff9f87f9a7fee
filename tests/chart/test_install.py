"""`helm install`, `helm upgrade` and `helm uninstall` of the chart on the local cluster.

The operator's container cannot run on the fake (KWOK) nodes, so the tests assert what the API
server accepted and what Helm created, changed and removed: objects, their fields, the webhook
certificate kept across upgrades, the CRD kept after uninstall, and that the operator pod passes
the `restricted` Pod Security Standard (the namespace enforces it).
"""

from __future__ import annotations

import base64
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.chart.helmcli import Helm, HelmError

pytestmark = pytest.mark.cluster

CRD_NAME = "meteredproducts.marketplace.metering.dev"
T = TypeVar("T")


# Generous: the cluster is shared with benchmarks that can keep the controller manager busy.
def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 180.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.2)


def gone(read: Callable[[], Any]) -> bool:
    try:
        read()
    except ApiException as err:
        if err.status == 404:
            return True
        raise
    return False


@pytest.fixture
def release(cluster_helm: Helm, kube: client.ApiClient, namespace: str) -> Iterator[str]:
    """A unique release (and fullname) in a namespace that enforces the restricted pod profile."""
    client.CoreV1Api(kube).patch_namespace(
        namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}}
    )
    name = f"mmo-{namespace}"
    yield name
    # Cluster-scoped objects outlive the namespace: always uninstall.
    cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


POLICIES = [
    ("validatingadmissionpolicies", "pod-records"),
    ("validatingadmissionpolicies", "product-pods"),
    ("validatingadmissionpolicies", "operator"),
    ("validatingadmissionpolicybindings", "product-pods"),
    ("mutatingadmissionpolicies", "gate"),
    ("mutatingadmissionpolicybindings", "gate"),
]


def base_values(name: str, namespace: str) -> dict[str, Any]:
    # watchNamespaces confines the webhook and the RBAC to this test's namespace, so a parallel
    # test elsewhere on the shared cluster never meets this release's webhook.
    return {"fullnameOverride": name, "watchNamespaces": [namespace]}


def test_install_upgrade_uninstall(
    cluster_helm: Helm, kube: client.ApiClient, namespace: str, release: str
) -> None:
    core = client.CoreV1Api(kube)
    apps = client.AppsV1Api(kube)
    rbac = client.RbacAuthorizationV1Api(kube)
    admission = client.AdmissionregistrationV1Api(kube)
    policy = client.PolicyV1Api(kube)
    extensions = client.ApiextensionsV1Api(kube)
    name = release
    role_arn = "arn:aws:iam::111122223333:role/metering-v1"

    # --- install ---
    values = base_values(name, namespace) | {"serviceAccount": {"roleArn": role_arn}}
    notes = cluster_helm.install(name, namespace, values=values).stdout
    # NOTES.txt: what was configured, and a warning while no product codes are trusted.
    assert role_arn in notes
    assert f"namespaces {namespace}" in notes
    assert "trustedProductCodes is empty" in notes
    assert "kubectl apply -f <chart>/crds/" in notes, "the CRD upgrade step"
    status = cluster_helm.status(name, namespace)
    assert status["info"]["status"] == "deployed"
    assert status["version"] == 1

    crd = extensions.read_custom_resource_definition(CRD_NAME)
    assert crd.spec.names.kind == "MeteredProduct"
    sa = core.read_namespaced_service_account(name, namespace)
    assert sa.metadata.annotations["eks.amazonaws.com/role-arn"] == role_arn
    deployment = apps.read_namespaced_deployment(name, namespace)
    assert deployment.spec.replicas == 1
    assert f"--namespace={namespace}" in deployment.spec.template.spec.containers[0].args
    assert rbac.read_namespaced_role(name, namespace).rules
    assert rbac.read_namespaced_role_binding(name, namespace).subjects[0].name == name
    assert rbac.read_cluster_role(f"{name}-cluster").rules
    with pytest.raises(ApiException) as missing:
        rbac.read_cluster_role(name)
    assert missing.value.status == 404, "namespaced mode must not grant pods cluster-wide"

    # On this 1.37 server `auto` found admissionregistration.k8s.io/v1 MutatingAdmissionPolicy by
    # discovery: the gate comes from the policy, there is no webhook, no certificate.
    custom = client.CustomObjectsApi(kube)
    for plural, suffix in POLICIES:
        policy_object = custom.get_cluster_custom_object(
            "admissionregistration.k8s.io", "v1", plural, f"{name}-{suffix}"
        )
        assert policy_object["metadata"]["labels"]["marketplace.metering.dev/policy-set"] == name
    with pytest.raises(ApiException) as missing:
        admission.read_mutating_webhook_configuration(name)
    assert missing.value.status == 404
    assert "--no-webhook" in deployment.spec.template.spec.containers[0].args
    assert "Gate:     added by the MutatingAdmissionPolicy" in notes

    # The controller manager turns the Deployment into a pod: the API server admitted it under
    # the restricted Pod Security Standard (a violation would leave the ReplicaSet without pods).
    selector = "app.kubernetes.io/component=operator,app.kubernetes.io/instance=" + name
    pods = wait_for(
        "the operator pod", lambda: core.list_namespaced_pod(namespace, label_selector=selector).items
    )
    pod = pods[0]
    assert pod.spec.service_account_name == name
    assert pod.spec.security_context.run_as_non_root is True
    assert pod.spec.containers[0].security_context.read_only_root_filesystem is True
    assert "marketplace.metering.dev/entitlement" not in {g.name for g in pod.spec.scheduling_gates or []}

    # --- upgrade: more replicas, new role, trusted codes, the webhook path (servers < 1.36) ---
    new_arn = "arn:aws:iam::111122223333:role/metering-v2"
    webhook_values = {"admissionPolicies": {"gate": "webhook"}}
    values = (
        base_values(name, namespace)
        | webhook_values
        | {
            "replicas": 2,
            "serviceAccount": {"roleArn": new_arn},
            "trustedProductCodes": ["1fszvu527waovqeuhpkyx2b5d"],
        }
    )
    notes = cluster_helm.install(name, namespace, values=values, upgrade=True).stdout
    assert "trustedProductCodes is empty" not in notes
    assert cluster_helm.status(name, namespace)["version"] == 2
    deployment = apps.read_namespaced_deployment(name, namespace)
    assert deployment.spec.replicas == 2
    assert (
        "--trusted-product-code=1fszvu527waovqeuhpkyx2b5d" in deployment.spec.template.spec.containers[0].args
    )
    assert (
        core.read_namespaced_service_account(name, namespace).metadata.annotations[
            "eks.amazonaws.com/role-arn"
        ]
        == new_arn
    )
    assert policy.read_namespaced_pod_disruption_budget(name, namespace).spec.min_available == 1
    secret = core.read_namespaced_secret(f"{name}-webhook-tls", namespace)
    webhook = admission.read_mutating_webhook_configuration(name).webhooks[0]
    assert webhook.client_config.ca_bundle == secret.data["ca.crt"]
    assert webhook.client_config.service.name == f"{name}-webhook"
    assert webhook.namespace_selector.match_expressions[0].values == [namespace]
    assert webhook.object_selector is None or not webhook.object_selector.match_expressions
    assert b"BEGIN CERTIFICATE" in base64.b64decode(secret.data["tls.crt"])
    assert gone(
        lambda: custom.get_cluster_custom_object(
            "admissionregistration.k8s.io", "v1", "mutatingadmissionpolicies", f"{name}-gate"
        )
    ), "one gate mechanism at a time"

    # --- upgrade back to one replica: the PDB goes away; lookup() keeps the webhook certificate ---
    cluster_helm.install(name, namespace, values=base_values(name, namespace) | webhook_values, upgrade=True)
    upgraded_secret = core.read_namespaced_secret(f"{name}-webhook-tls", namespace)
    assert upgraded_secret.data == secret.data
    assert (
        admission.read_mutating_webhook_configuration(name).webhooks[0].client_config.ca_bundle
        == (secret.data["ca.crt"])
    )
    assert gone(lambda: policy.read_namespaced_pod_disruption_budget(name, namespace))
    annotations = core.read_namespaced_service_account(name, namespace).metadata.annotations or {}
    assert "eks.amazonaws.com/role-arn" not in annotations

    # --- uninstall: everything goes except the CRD (and so every MeteredProduct and its ledger) ---
    cluster_helm.uninstall(name, namespace)
    checks: dict[str, Callable[[], Any]] = {
        "Deployment": lambda: apps.read_namespaced_deployment(name, namespace),
        "ServiceAccount": lambda: core.read_namespaced_service_account(name, namespace),
        "Secret": lambda: core.read_namespaced_secret(f"{name}-webhook-tls", namespace),
        "Service": lambda: core.read_namespaced_service(f"{name}-webhook", namespace),
        "Role": lambda: rbac.read_namespaced_role(name, namespace),
        "ClusterRole": lambda: rbac.read_cluster_role(f"{name}-cluster"),
        "ClusterRoleBinding": lambda: rbac.read_cluster_role_binding(f"{name}-cluster"),
        "MutatingWebhookConfiguration": lambda: admission.read_mutating_webhook_configuration(name),
        **{
            f"{plural}/{suffix}": functools.partial(
                custom.get_cluster_custom_object,
                "admissionregistration.k8s.io",
                "v1",
                plural,
                f"{name}-{suffix}",
            )
            for plural, suffix in POLICIES
            if plural.startswith("validating")
        },
    }
    for kind, read in checks.items():
        assert wait_for(f"{kind} to be deleted", functools.partial(gone, read)), kind
    assert extensions.read_custom_resource_definition(CRD_NAME).metadata.name == CRD_NAME


def test_bad_values_fail_install_and_create_nothing(
    cluster_helm: Helm, kube: client.ApiClient, namespace: str, release: str
) -> None:
    values = base_values(release, namespace) | {"webhook": {"failurePolicy": "Maybe"}}
    with pytest.raises(HelmError) as failed:
        cluster_helm.install(release, namespace, values=values)
    assert "/webhook/failurePolicy" in failed.value.stderr
    listed = cluster_helm.run("list", "--namespace", namespace, "--all", "--short").stdout.split()
    assert release not in listed
    assert gone(lambda: client.AppsV1Api(kube).read_namespaced_deployment(release, namespace))
