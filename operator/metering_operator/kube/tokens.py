"""TokenRequest: a service-account token bound to one pod, for STS AssumeRoleWithWebIdentity.

The token carries the pod's name and uid in its ``kubernetes.io`` claim and dies with the pod,
so the IRSA session it buys identifies exactly that pod (how AWS tells pods apart for billing).
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

from metering_operator.kube.rawapi import RawApi, segment

STS_AUDIENCE = "sts.amazonaws.com"
#: The API server refuses expirations under 10 minutes.
MIN_EXPIRATION_SECONDS = 600


def request_pod_token(
    api: client.ApiClient,
    *,
    namespace: str,
    service_account: str,
    pod_name: str,
    pod_uid: str,
    audience: str = STS_AUDIENCE,
    expiration_seconds: int = MIN_EXPIRATION_SECONDS,
    raw: RawApi | None = None,
) -> str:
    """A token for ``service_account`` bound to the pod; ``raw`` reuses a :class:`RawApi` of ``api``."""
    if expiration_seconds < MIN_EXPIRATION_SECONDS:
        raise ValueError(f"token expiration must be at least {MIN_EXPIRATION_SECONDS}s")
    body: dict[str, Any] = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [audience],
            "expirationSeconds": expiration_seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod_name, "uid": pod_uid},
        },
    }
    # Sent as JSON over the client's connection (kube/rawapi.py): the generated API's per-call
    # machinery cost about a fifth of the request's CPU, once per gated pod.
    path = f"/api/v1/namespaces/{segment(namespace)}/serviceaccounts/{segment(service_account)}/token"
    token = json.loads((raw or RawApi(api)).exchange("POST", path, body)[0]).get("status", {}).get("token")
    if not token:
        raise RuntimeError(f"TokenRequest for {namespace}/{service_account} returned no token")
    return str(token)
