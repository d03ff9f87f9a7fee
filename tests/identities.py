"""Acting as someone other than the cluster admin: a ServiceAccount's own token, never admin rights.

Security claims are proven as the attacker: a namespace user bound to the built-in ``edit``
ClusterRole (the buyer's ordinary rights), or the operator's ServiceAccount. Each client is built
from a kubeconfig holding only a fresh token of that ServiceAccount, and checks with a
SelfSubjectReview whose identity it carries.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from devtools.cluster import ClusterInfo
from kubernetes import client, config
from kubernetes.client.rest import ApiException


def token_kubeconfig(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, sa: str, path: Path
) -> Path:
    """A kubeconfig that authenticates only with a fresh one-hour token of ``namespace/sa``."""
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[cluster.issuer], expiration_seconds=3600)
    )
    token = (
        client.CoreV1Api(kube).create_namespaced_service_account_token(sa, namespace, request).status.token
    )
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "local",
                        "cluster": {"server": cluster.server, "certificate-authority": str(cluster.ca_file)},
                    }
                ],
                "users": [{"name": sa, "user": {"token": token}}],
                "contexts": [
                    {"name": "operator", "context": {"cluster": "local", "user": sa, "namespace": namespace}}
                ],
                "current-context": "operator",
            }
        )
    )
    return path


def service_account_client(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, sa: str, path: Path
) -> client.ApiClient:
    """An ApiClient with only ``namespace/sa``'s token; proves whose identity it carries."""
    api: client.ApiClient = config.new_client_from_config(
        config_file=str(token_kubeconfig(cluster, kube, namespace, sa, path))
    )
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:{sa}"
    assert "system:masters" not in (review.status.user_info.groups or [])
    return api


def ensure_service_account(kube: client.ApiClient, namespace: str, name: str, **annotations: str) -> None:
    body: dict[str, Any] = {"metadata": {"name": name, "annotations": annotations or None}}
    try:
        client.CoreV1Api(kube).create_namespaced_service_account(namespace, body)
    except ApiException as err:
        if err.status != 409:
            raise


def edit_user(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, path: Path, name: str = "buyer"
) -> client.ApiClient:
    """A namespace user with the built-in ``edit`` ClusterRole in ``namespace`` only (not admin)."""
    ensure_service_account(kube, namespace, name)
    client.RbacAuthorizationV1Api(kube).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": f"{name}-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    )
    return service_account_client(cluster, kube, namespace, name, path)


def refusal(call: Any, *args: Any, **kwargs: Any) -> ApiException:
    """Make ``call`` and return the API server's refusal (fails if it was accepted)."""
    try:
        call(*args, **kwargs)
    except ApiException as err:
        return err
    raise AssertionError(f"{getattr(call, '__name__', call)} was accepted; expected the API server to refuse")


def outcome(call: Any, *args: Any, **kwargs: Any) -> ApiException | None:
    """Make ``call``; the API server's refusal, or None if it was accepted."""
    try:
        call(*args, **kwargs)
    except ApiException as err:
        return err
    return None


def refused_once_in_force(call: Any, text: str, timeout: float = 30.0) -> ApiException:
    """The refusal ``call`` gets once a just-installed admission policy is loaded.

    The API server loads new policies and bindings asynchronously (about a second); until then a
    request may still be accepted. Only for requests that change nothing when accepted (dry runs,
    reads, or writes a test does not depend on).
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        err = outcome(call)
        if err is not None and text in str(err.body):
            return err
        if time.monotonic() > deadline:
            raise AssertionError(f"never refused with {text!r}; last answer: {err}")
        time.sleep(0.3)
