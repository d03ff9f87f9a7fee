"""The local control plane does what the rest of the suite relies on (real API server, no mocks).

Fake nodes run Deployments' pods, scheduling gates hold pods until removed, pod-bound
TokenRequest tokens verify against the JWKS the API server publishes anonymously (what the
AWS emulator's STS does), and the cached kubectl/Helm binaries work against the cluster.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import jwt
import pytest
from devtools.cluster import NODE_CAPACITY, ClusterInfo, bin_path, pinned_versions
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

pytestmark = pytest.mark.cluster

GATE = "marketplace.metering.dev/entitlement"
STS_AUDIENCE = "sts.amazonaws.com"
WAIT = 90.0  # generous: the CI machine's 2 cores are shared with the whole control plane

T = TypeVar("T")


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def condition(pod: client.V1Pod, type_: str) -> client.V1PodCondition | None:
    for cond in pod.status.conditions or []:
        if cond.type == type_:
            return cond
    return None


def container(name: str = "app") -> client.V1Container:
    # Nothing is pulled or run on fake nodes; the image name only has to be valid.
    return client.V1Container(
        name=name,
        image="app:1.0",
        resources=client.V1ResourceRequirements(requests={"cpu": "100m", "memory": "64Mi"}),
    )


def anonymous_get(cluster: ClusterInfo, url: str) -> tuple[int, Any]:
    """GET without credentials, trusting only the cluster CA (as the emulator's STS does)."""
    ctx = ssl.create_default_context(cafile=str(cluster.ca_file))
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def test_fake_nodes_are_ready_with_the_configured_capacity(kube: client.ApiClient, cluster: ClusterInfo):
    nodes = {n.metadata.name: n for n in client.CoreV1Api(kube).list_node().items}

    assert set(cluster.nodes) <= set(nodes)
    for name in cluster.nodes:
        node = nodes[name]
        ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
        assert [c.status for c in ready] == ["True"], f"{name} is not Ready: {node.status.conditions}"
        for resource in ("cpu", "memory", "pods"):
            # Compared as quantities: the API server canonicalises "1000" to "1k".
            allocatable = parse_quantity(node.status.allocatable[resource])
            assert allocatable == parse_quantity(NODE_CAPACITY[resource])


def test_deployment_of_three_replicas_yields_three_running_pods_on_fake_nodes(
    kube: client.ApiClient, namespace: str, cluster: ClusterInfo
):
    labels = {"app": "web"}
    client.AppsV1Api(kube).create_namespaced_deployment(
        namespace,
        client.V1Deployment(
            metadata=client.V1ObjectMeta(name="web"),
            spec=client.V1DeploymentSpec(
                replicas=3,
                selector=client.V1LabelSelector(match_labels=labels),
                template=client.V1PodTemplateSpec(
                    metadata=client.V1ObjectMeta(labels=labels),
                    spec=client.V1PodSpec(containers=[container()]),
                ),
            ),
        ),
    )
    core = client.CoreV1Api(kube)

    def running_pods() -> list[client.V1Pod] | None:
        pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
        running = [p for p in pods if p.status.phase == "Running"]
        return running if len(running) == 3 else None

    pods = wait_until("3 Running pods", running_pods)

    for pod in pods:
        assert pod.spec.node_name in cluster.nodes
        ready = condition(pod, "Ready")
        assert ready is not None
        assert ready.status == "True"
        # Controller manager chain: Deployment -> ReplicaSet -> Pod.
        assert [o.kind for o in pod.metadata.owner_references] == ["ReplicaSet"]
    deployment = wait_until(
        "Deployment readyReplicas == 3",
        lambda: (
            d
            if (
                d := client.AppsV1Api(kube).read_namespaced_deployment("web", namespace)
            ).status.ready_replicas
            == 3
            else None
        ),
    )
    assert deployment.status.available_replicas == 3


def test_scheduling_gate_holds_a_pod_until_removed(
    kube: client.ApiClient, namespace: str, cluster: ClusterInfo
):
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="gated"),
            spec=client.V1PodSpec(
                containers=[container()], scheduling_gates=[client.V1PodSchedulingGate(name=GATE)]
            ),
        ),
    )

    def gated() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("gated", namespace)
        cond = condition(pod, "PodScheduled")
        ok = cond is not None and cond.status == "False" and cond.reason == "SchedulingGated"
        return pod if ok else None

    wait_until("PodScheduled=False/SchedulingGated", gated)
    # The gate must *hold*: watch it for a while with the scheduler and KWOK running.
    hold_until = time.monotonic() + 3.0
    while time.monotonic() < hold_until:
        pod = core.read_namespaced_pod("gated", namespace)
        assert pod.spec.node_name is None, "a gated pod was bound to a node"
        assert pod.status.phase == "Pending"
        time.sleep(0.25)

    core.patch_namespaced_pod("gated", namespace, [{"op": "remove", "path": "/spec/schedulingGates"}])

    def running() -> client.V1Pod | None:
        pod = core.read_namespaced_pod("gated", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = wait_until("the ungated pod to run", running)
    assert pod.spec.node_name in cluster.nodes
    scheduled = condition(pod, "PodScheduled")
    assert scheduled is not None
    assert scheduled.status == "True"


def test_gates_can_only_be_removed_not_added(kube: client.ApiClient, namespace: str):
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="ungated"), spec=client.V1PodSpec(containers=[container()])
        ),
    )
    with pytest.raises(ApiException) as err:
        core.patch_namespaced_pod(
            "ungated", namespace, [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": GATE}]}]
        )
    assert err.value.status == 422
    assert "schedulingGates" in err.value.body


def _pod_with_service_account(core: client.CoreV1Api, namespace: str, sa: str) -> client.V1Pod:
    core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=sa))
    )
    return core.create_namespaced_pod(
        namespace,
        client.V1Pod(
            metadata=client.V1ObjectMeta(name="workload"),
            spec=client.V1PodSpec(service_account_name=sa, containers=[container()]),
        ),
    )


def _bound_token(core: client.CoreV1Api, namespace: str, sa: str, pod: client.V1Pod) -> str:
    req = core.create_namespaced_service_account_token(
        sa,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                audiences=[STS_AUDIENCE],
                expiration_seconds=3600,
                bound_object_ref=client.V1BoundObjectReference(
                    api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
                ),
            )
        ),
    )
    token: str = req.status.token
    return token


def test_pod_bound_token_verifies_against_the_published_jwks(
    kube: client.ApiClient, namespace: str, cluster: ClusterInfo
):
    core = client.CoreV1Api(kube)
    pod = _pod_with_service_account(core, namespace, "metered-app")
    token = _bound_token(core, namespace, "metered-app", pod)

    status, discovery = anonymous_get(cluster, f"{cluster.issuer}/.well-known/openid-configuration")
    assert status == 200
    assert discovery["issuer"] == cluster.issuer
    assert discovery["jwks_uri"] == cluster.jwks_uri
    status, jwks = anonymous_get(cluster, discovery["jwks_uri"])
    assert status == 200
    keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(jwks).keys}
    header = jwt.get_unverified_header(token)
    assert header["kid"] in keys

    claims = jwt.decode(
        token,
        keys[header["kid"]].key,
        algorithms=[header["alg"]],
        audience=STS_AUDIENCE,
        issuer=cluster.issuer,
    )

    assert claims["sub"] == f"system:serviceaccount:{namespace}:metered-app"
    k8s = claims["kubernetes.io"]
    assert k8s["namespace"] == namespace
    assert k8s["serviceaccount"]["name"] == "metered-app"
    assert k8s["pod"] == {"name": "workload", "uid": pod.metadata.uid}

    # The same keys must reject what STS would reject: another audience, a forged payload.
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(token, keys[header["kid"]].key, algorithms=[header["alg"]], audience="someone-else")
    head, _payload, sig = token.split(".")
    forged_claims = {**claims, "sub": "system:serviceaccount:kube-system:default"}
    forged = base64.urlsafe_b64encode(json.dumps(forged_claims).encode()).rstrip(b"=").decode()
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(
            f"{head}.{forged}.{sig}",
            keys[header["kid"]].key,
            algorithms=[header["alg"]],
            audience=STS_AUDIENCE,
        )


def test_only_the_discovery_endpoints_are_public(cluster: ClusterInfo):
    status, _ = anonymous_get(cluster, f"{cluster.server}/api/v1/namespaces/default/secrets")
    assert status in (401, 403)


def test_pod_bound_token_dies_with_its_pod(kube: client.ApiClient, namespace: str):
    core = client.CoreV1Api(kube)
    auth = client.AuthenticationV1Api(kube)
    pod = _pod_with_service_account(core, namespace, "short-lived")
    token = _bound_token(core, namespace, "short-lived", pod)

    def review() -> client.V1TokenReviewStatus:
        return auth.create_token_review(
            client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[STS_AUDIENCE]))
        ).status

    alive = review()
    assert alive.authenticated is True
    assert alive.user.extra["authentication.kubernetes.io/pod-uid"] == [pod.metadata.uid]

    core.delete_namespaced_pod("workload", namespace, grace_period_seconds=0)
    # The API server caches a successful token authentication for about 10 s, so the rejection
    # shows up after that, not at once.
    wait_until("the bound token to be rejected", lambda: review().authenticated is not True)


def test_kubectl_and_helm_binaries_work_against_the_cluster(cluster: ClusterInfo):
    versions = pinned_versions()
    env = {**os.environ, **cluster.env()}

    def run(tool: str, *args: str) -> str:
        return subprocess.run(
            [bin_path(tool), *args], env=env, check=True, capture_output=True, text=True
        ).stdout

    reported = json.loads(run("kubectl", "version", "-o", "json"))
    assert reported["clientVersion"]["gitVersion"] == versions["k8s"]
    assert reported["serverVersion"]["gitVersion"] == versions["k8s"]
    nodes = run("kubectl", "get", "nodes", "-o", "name").split()
    assert {f"node/{n}" for n in cluster.nodes} <= set(nodes)
    assert run("helm", "version", "--template", "{{.Version}}").strip() == versions["helm"]
    assert isinstance(json.loads(run("helm", "list", "--all-namespaces", "-o", "json")), list)
