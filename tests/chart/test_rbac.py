"""RBAC proof: the chart's ServiceAccount can do what the operator needs, and nothing on the forbidden list.

The chart is installed on the local cluster, a token is minted for its ServiceAccount
(TokenRequest), and every check runs with a kubeconfig holding only that token, not the admin's:
SelfSubjectAccessReview for each permission, plus a few real calls. The lists below are the
operator's contract with docs/rbac.md; a new API call in the operator needs a line here and a rule
in the chart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from tests.chart.helmcli import Helm
from tests.conftest import temporary_namespace
from tests.identities import refused_once_in_force, token_kubeconfig

pytestmark = pytest.mark.cluster

GROUP = "marketplace.metering.dev"
# Placeholders resolved per test: the release's namespace, a namespace the operator watches, and
# one it must not touch (namespaced mode).
RELEASE_NS, WATCHED_NS, OTHER_NS, CLUSTER = "<release>", "<watched>", "<other>", ""


@dataclass(frozen=True)
class Access:
    verb: str
    resource: str
    group: str = ""
    subresource: str = ""
    namespace: str = WATCHED_NS
    name: str = ""

    def __str__(self) -> str:
        res = f"{self.resource}/{self.subresource}" if self.subresource else self.resource
        grp = f".{self.group}" if self.group else ""
        where = f" in {self.namespace}" if self.namespace else " (cluster)"
        return f"{self.verb} {res}{grp}{' ' + self.name if self.name else ''}{where}"


NEEDED = [
    *[Access(v, "meteredproducts", GROUP) for v in ("get", "list", "watch", "patch")],
    *[Access(v, "meteredproducts", GROUP, "status") for v in ("get", "patch", "update")],
    *[Access(v, "pods") for v in ("get", "list", "watch", "patch")],
    Access("create", "pods", subresource="eviction"),
    Access("get", "serviceaccounts"),
    Access("create", "serviceaccounts", subresource="token"),
    Access("get", "configmaps"),
    Access("create", "events"),
    *[
        Access(v, r, "apps")
        for r in ("deployments", "statefulsets", "daemonsets")
        for v in ("get", "list", "watch", "patch")
    ],
    Access("get", "replicasets", "apps"),
    *[Access(v, "leases", "coordination.k8s.io", namespace=RELEASE_NS) for v in ("get", "create", "update")],
    Access("create", "events", namespace=RELEASE_NS),
    # denial records and the metering journal (docs/metering.md), in the operator's namespace only
    *[Access(v, "configmaps", namespace=RELEASE_NS) for v in ("get", "list", "create", "patch", "delete")],
    *[
        Access(v, "customresourcedefinitions", "apiextensions.k8s.io", namespace=CLUSTER)
        for v in ("get", "list", "watch")
    ],
    Access("list", "namespaces", namespace=CLUSTER),
    Access("watch", "namespaces", namespace=CLUSTER),
    Access("get", "namespaces", namespace=CLUSTER, name="kube-system"),
]

FORBIDDEN = [
    *[
        Access(v, "secrets", namespace=ns)
        for v in ("get", "list", "watch")
        for ns in (WATCHED_NS, RELEASE_NS)
    ],
    Access("delete", "pods"),
    # Neither `update` nor `patch` of a workload's spec is the operator's: `update` is not granted,
    # and `patch` (granted for the summary annotation) is narrowed to marketplace.metering.dev/*
    # annotations by the `-operator` admission policy. (This list used to forbid `update` while
    # allowing `patch` as if that made a difference; see test_operator_as_chart_sa.py for the real
    # patch attempts refused by the policy.)
    Access("deletecollection", "pods"),
    Access("create", "pods"),
    Access("update", "pods"),
    Access("create", "pods", subresource="exec"),
    Access("patch", "pods", subresource="status"),
    Access("get", "pods", subresource="log"),
    Access("create", "meteredproducts", GROUP),
    Access("delete", "meteredproducts", GROUP),
    Access("update", "meteredproducts", GROUP),
    *[Access(v, "deployments", "apps") for v in ("create", "update", "delete")],
    Access("patch", "deployments", "apps", "scale"),
    Access("patch", "replicasets", "apps"),
    Access("list", "replicasets", "apps"),
    Access("list", "configmaps"),
    Access("update", "configmaps"),
    Access("create", "configmaps"),
    Access("patch", "configmaps"),
    Access("update", "configmaps", namespace=RELEASE_NS),
    Access("create", "serviceaccounts"),
    Access("patch", "serviceaccounts"),
    Access("delete", "events"),
    Access("patch", "events"),
    *[
        Access("create", r, "rbac.authorization.k8s.io", namespace=CLUSTER)
        for r in ("clusterroles", "clusterrolebindings")
    ],
    *[Access("create", r, "rbac.authorization.k8s.io") for r in ("roles", "rolebindings")],
    Access("escalate", "clusterroles", "rbac.authorization.k8s.io", namespace=CLUSTER),
    Access("bind", "clusterroles", "rbac.authorization.k8s.io", namespace=CLUSTER),
    Access("impersonate", "users", namespace=CLUSTER),
    Access("impersonate", "groups", namespace=CLUSTER),
    Access("impersonate", "serviceaccounts"),
    Access("patch", "nodes", namespace=CLUSTER),
    Access("list", "nodes", namespace=CLUSTER),
    Access("create", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", namespace=CLUSTER),
    Access("patch", "mutatingwebhookconfigurations", "admissionregistration.k8s.io", namespace=CLUSTER),
    Access("update", "customresourcedefinitions", "apiextensions.k8s.io", namespace=CLUSTER),
    Access("delete", "customresourcedefinitions", "apiextensions.k8s.io", namespace=CLUSTER),
    Access("get", "namespaces", namespace=CLUSTER, name="default"),
    Access("delete", "namespaces", namespace=CLUSTER, name="kube-system"),
    Access("delete", "leases", "coordination.k8s.io", namespace=RELEASE_NS),
    Access("create", "leases", "coordination.k8s.io", namespace=WATCHED_NS),
    Access("create", "certificatesigningrequests", "certificates.k8s.io", namespace=CLUSTER),
]

# Namespaced mode: nothing namespaced outside the listed namespaces, nor cluster-wide.
FORBIDDEN_OUTSIDE = [
    *[
        Access(a.verb, a.resource, a.group, a.subresource, namespace=OTHER_NS)
        for a in NEEDED
        if a.namespace == WATCHED_NS
    ],
    Access("list", "pods", namespace=CLUSTER),
    Access("watch", "meteredproducts", GROUP, namespace=CLUSTER),
    Access("create", "serviceaccounts", subresource="token", namespace="kube-system"),
]


def resolve(access: Access, release_ns: str, watched_ns: str, other_ns: str) -> Access:
    mapping = {RELEASE_NS: release_ns, WATCHED_NS: watched_ns, OTHER_NS: other_ns}
    return Access(
        access.verb,
        access.resource,
        access.group,
        access.subresource,
        mapping.get(access.namespace, access.namespace),
        access.name,
    )


def can_i(api: client.ApiClient, access: Access) -> bool:
    review = client.AuthorizationV1Api(api).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(
                resource_attributes=client.V1ResourceAttributes(
                    verb=access.verb,
                    group=access.group,
                    resource=access.resource,
                    subresource=access.subresource or None,
                    namespace=access.namespace or None,
                    name=access.name or None,
                )
            )
        )
    )
    return bool(review.status.allowed)


@pytest.fixture
def other_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-other-") as name:
        yield name


def install(helm: Helm, name: str, namespace: str, values: dict[str, Any]) -> None:
    # The webhook only ever sees this test's namespace, so parallel tests are never affected.
    values = {
        "fullnameOverride": name,
        "webhook": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
        **values,
    }
    helm.install(name, namespace, values=values)


def operator_client(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, sa: str, tmp_path: Path
) -> client.ApiClient:
    kubeconfig = token_kubeconfig(cluster, kube, namespace, sa, tmp_path / "operator.kubeconfig")
    api: client.ApiClient = config.new_client_from_config(config_file=str(kubeconfig))
    # Prove whose identity the checks run under.
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:{sa}"
    assert "system:masters" not in (review.status.user_info.groups or [])
    return api


def check(api: client.ApiClient, accesses: list[Access], expect: bool) -> list[str]:
    return [str(a) for a in accesses if can_i(api, a) != expect]


def test_cluster_wide_rbac_allows_needed_and_denies_forbidden(
    cluster: ClusterInfo, cluster_helm: Helm, kube: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    name = f"mmo-{namespace}"
    try:
        install(cluster_helm, name, namespace, {"watch": {"mode": "cluster"}})
        api = operator_client(cluster, kube, namespace, name, tmp_path)
        try:
            # A product namespace that is not the operator's own.
            needed = [resolve(a, namespace, "product-ns", "unused") for a in NEEDED]
            forbidden = [resolve(a, namespace, "product-ns", "unused") for a in FORBIDDEN]
            assert check(api, needed, True) == [], "the operator lacks permissions it needs"
            assert check(api, forbidden, False) == [], "the operator holds permissions it must not"

            # Real calls with the same token, not only reviews.
            core = client.CoreV1Api(api)
            core.list_namespaced_pod(namespace)
            # RBAC grants TokenRequests cluster-wide in this mode; the chart's `-operator` admission
            # policy narrows them (pod-bound only; tests/chart/test_operator_as_chart_sa.py has the rest).
            unbound = client.AuthenticationV1TokenRequest(
                spec=client.V1TokenRequestSpec(audiences=["sts.amazonaws.com"], expiration_seconds=600)
            )
            refused_token = refused_once_in_force(
                lambda: core.create_namespaced_service_account_token("default", namespace, unbound),
                "may only mint tokens bound to a Pod",
            )
            assert refused_token.status == 403
            # ... and nothing at all in kube-system, although RBAC cannot exclude it.
            with pytest.raises(ApiException) as refused:
                client.AppsV1Api(api).patch_namespaced_deployment(
                    "nothing-here", "kube-system", {"metadata": {"annotations": {"x": "y"}}}
                )
            assert refused.value.status in (403, 404)
            denied_calls: list[Callable[[], object]] = [
                lambda: core.list_namespaced_secret(namespace),
                lambda: core.read_namespaced_secret(f"{name}-webhook-tls", namespace),
                lambda: core.delete_collection_namespaced_pod(namespace),
                lambda: client.RbacAuthorizationV1Api(api).create_cluster_role(
                    client.V1ClusterRole(
                        metadata=client.V1ObjectMeta(name=f"{name}-escalated"),
                        rules=[client.V1PolicyRule(verbs=["*"], api_groups=["*"], resources=["*"])],
                    )
                ),
            ]
            for denied_call in denied_calls:
                with pytest.raises(ApiException) as err:
                    denied_call()
                assert err.value.status == 403
        finally:
            api.close()
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_namespaced_rbac_is_confined_to_watched_namespaces(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    other_namespace: str,
    tmp_path: Path,
) -> None:
    name = f"mmo-{namespace}"
    watched = other_namespace  # the operator lives in `namespace` and watches another one
    try:
        install(cluster_helm, name, namespace, {"watchNamespaces": [watched]})
        api = operator_client(cluster, kube, namespace, name, tmp_path)
        try:
            needed = [resolve(a, namespace, watched, "not-watched") for a in NEEDED]
            forbidden = [resolve(a, namespace, watched, "not-watched") for a in FORBIDDEN + FORBIDDEN_OUTSIDE]
            assert check(api, needed, True) == []
            assert check(api, forbidden, False) == []
            core = client.CoreV1Api(api)
            core.list_namespaced_pod(watched)
            with pytest.raises(ApiException) as err:
                core.list_pod_for_all_namespaces()
            assert err.value.status == 403
        finally:
            api.close()
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_default_install_is_namespaced_and_never_kube_system(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    other_namespace: str,
    tmp_path: Path,
) -> None:
    """`helm install` with no values: the operator may act in its own namespace only."""
    name = f"mmo-{namespace}"
    try:
        install(cluster_helm, name, namespace, {})
        api = operator_client(cluster, kube, namespace, name, tmp_path)
        try:
            needed = [resolve(a, namespace, namespace, other_namespace) for a in NEEDED]
            assert check(api, needed, True) == []
            elsewhere = [
                resolve(a, namespace, other_namespace, other_namespace)
                for a in NEEDED
                if a.namespace == WATCHED_NS
            ]
            kube_system = [
                resolve(a, namespace, "kube-system", "kube-system")
                for a in NEEDED
                if a.namespace == WATCHED_NS
            ]
            assert check(api, elsewhere + kube_system + forbidden_elsewhere(namespace), False) == []
        finally:
            api.close()
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def forbidden_elsewhere(namespace: str) -> list[Access]:
    return [resolve(a, namespace, "kube-system", "kube-system") for a in FORBIDDEN + FORBIDDEN_OUTSIDE]
