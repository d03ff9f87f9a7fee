"""Per-pod IRSA with a token minted by the real local kube-apiserver (TokenRequest bound to a pod).

The emulator verifies the token against the API server's own ``/openid/v1/jwks`` (fetched over
HTTPS with the cluster CA, as STS fetches an EKS OIDC provider's keys), so this proves that the
adapter's exchange works with genuine projected service-account tokens, not only test tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from metering_operator.aws.client import MeteringClientFactory
from metering_operator.aws.irsa import WebIdentityExchanger, session_name_for_pod
from metering_operator.aws.models import RegisterUsageRequest
from tests.aws.conftest import ENTITLED_ACCOUNT, HOURLY_PRODUCT, REGION
from tests.emulator.harness import EmulatorProcess, start_emulator

pytestmark = pytest.mark.cluster

ROLE = f"arn:aws:iam::{ENTITLED_ACCOUNT}:role/cluster-pods"
GATE = "marketplace.metering.dev/entitlement"


@pytest.fixture
def cluster_emulator(cluster: ClusterInfo, namespace: str, tmp_path: Path) -> Iterator[EmulatorProcess]:
    config = {
        "region": REGION,
        "products": [{"productCode": HOURLY_PRODUCT, "entitledAccounts": [ENTITLED_ACCOUNT]}],
        "roles": [
            {
                "arn": ROLE,
                "trust": [
                    {"issuer": cluster.issuer, "subjects": [f"system:serviceaccount:{namespace}:default"]}
                ],
            }
        ],
        "issuers": [{"issuer": cluster.issuer, "jwksUrl": cluster.jwks_uri, "caFile": str(cluster.ca_file)}],
    }
    emulator = start_emulator(config, tmp_path / "state")
    try:
        yield emulator
    finally:
        emulator.stop()


def gated_pod(core: client.CoreV1Api, namespace: str) -> client.V1Pod:
    # Gated so it never needs a node: TokenRequest only needs the pod object to exist.
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(generate_name="irsa-"),
        spec=client.V1PodSpec(
            containers=[client.V1Container(name="app", image="registry.invalid/app:1")],
            scheduling_gates=[client.V1PodSchedulingGate(name=GATE)],
        ),
    )
    created: client.V1Pod = core.create_namespaced_pod(namespace, pod)
    return created


def pod_token(core: client.CoreV1Api, namespace: str, pod: client.V1Pod) -> str:
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(
            audiences=["sts.amazonaws.com"],
            expiration_seconds=600,
            bound_object_ref=client.V1BoundObjectReference(
                api_version="v1", kind="Pod", name=pod.metadata.name, uid=pod.metadata.uid
            ),
        )
    )
    response = core.create_namespaced_service_account_token("default", namespace, request)
    return str(response.status.token)


def test_pod_bound_token_from_the_apiserver_registers_that_pod(
    kube: client.ApiClient, namespace: str, cluster_emulator: EmulatorProcess
) -> None:
    core = client.CoreV1Api(kube)
    pod = gated_pod(core, namespace)
    token = pod_token(core, namespace, pod)
    # The apiserver put the pod into the token: that is what tells pods apart at AWS.
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["kubernetes.io"]["pod"]["uid"] == pod.metadata.uid

    exchanger = WebIdentityExchanger(REGION, endpoint_url=cluster_emulator.url)
    creds = exchanger.assume(ROLE, token, session_name=session_name_for_pod(pod.metadata.uid))
    assert creds.subject == f"system:serviceaccount:{namespace}:default"

    factory = MeteringClientFactory(REGION, endpoint_url=cluster_emulator.url)
    with factory.for_credentials(creds) as metering:
        result = metering.register_usage(
            RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce=pod.metadata.uid)
        )
    signed = jwt.decode(
        result.signature, cluster_emulator.admin.public_key_pem(HOURLY_PRODUCT, 1), algorithms=["PS256"]
    )
    assert signed["nonce"] == pod.metadata.uid
    registrations = cluster_emulator.admin.registrations(HOURLY_PRODUCT)
    assert len(registrations) == 1
    assert pod.metadata.uid in str(registrations[0])
