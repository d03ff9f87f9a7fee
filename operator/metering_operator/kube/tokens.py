"""TokenRequest: a service-account token bound to one pod, for STS AssumeRoleWithWebIdentity.

The token carries the pod's name and uid in its ``kubernetes.io`` claim and dies with the pod,
so the IRSA session it buys identifies exactly that pod (how AWS tells pods apart for billing).
"""

from __future__ import annotations

import json
from typing import Any

from kubernetes import client

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
) -> str:
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
    response = client.CoreV1Api(api).create_namespaced_service_account_token(
        service_account, namespace, body, _preload_content=False
    )
    token = json.loads(response.data).get("status", {}).get("token")
    if not token:
        raise RuntimeError(f"TokenRequest for {namespace}/{service_account} returned no token")
    return str(token)
