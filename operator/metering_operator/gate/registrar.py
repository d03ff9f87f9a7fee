"""One RegisterUsage for a pod (its own IRSA identity) or for the cluster (the operator's identity).

Blocking (TokenRequest, STS, RegisterUsage): runs in the gate's AWS worker threads, one attempt
per call (retries are the state machine's, :mod:`metering_operator.gate.machine`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from kubernetes import client

from metering_operator.aws.client import MeteringClient, MeteringClientFactory, client_config
from metering_operator.aws.irsa import ROLE_ARN_ANNOTATION, IrsaCredentialCache, WebIdentityExchanger
from metering_operator.aws.models import RegisterUsageRequest
from metering_operator.domain.clock import Clock
from metering_operator.domain.signature import ProductKey, VerifiedSignature
from metering_operator.kube.pods import PodApi
from metering_operator.kube.tokens import request_pod_token

#: Service accounts change rarely; a short cache saves a GET per pod in a burst.
SA_CACHE_SECONDS = 10.0


class RegistrationSetupError(Exception):
    """The pod cannot be registered as configured (e.g. no IRSA role): an Error, retried later."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def register(metering: MeteringClient, key: ProductKey, nonce: str) -> VerifiedSignature:
    """RegisterUsage with ``metering``'s credentials, then verify: a bad signature is an error."""
    result = metering.register_usage(
        RegisterUsageRequest(
            product_code=key.product_code, public_key_version=key.public_key_version, nonce=nonce
        )
    )
    return key.verify(result.signature, nonce)


class Registrar:
    def __init__(
        self,
        api: client.ApiClient,
        pods: PodApi,
        region: str,
        clock: Clock,
        token_expiration_seconds: int = 600,
    ) -> None:
        self.api = api
        self.pods = pods
        # Two AWS calls per gated pod: botocore's own parameter validation repeats what the typed
        # requests (aws/models.py, pydantic) and the exchanger's ARN / session-name checks have
        # already refused, at about 5% of each call's CPU.
        config = client_config(parameter_validation=False)
        self.factory = MeteringClientFactory(region, config=config)
        self.credentials = IrsaCredentialCache(WebIdentityExchanger(region, config=config), clock)
        self.token_expiration_seconds = token_expiration_seconds
        self._sa_cache: dict[tuple[str, str], tuple[float, str | None]] = {}
        self._lock = threading.Lock()

    def role_arn(self, namespace: str, service_account: str) -> str | None:
        key = (namespace, service_account)
        now = time.monotonic()
        with self._lock:
            cached = self._sa_cache.get(key)
            if cached and now - cached[0] < SA_CACHE_SECONDS:
                return cached[1]
        sa = self.pods.service_account(namespace, service_account)
        arn = (sa.get("metadata", {}).get("annotations") or {}).get(ROLE_ARN_ANNOTATION)
        with self._lock:
            self._sa_cache[key] = (now, arn)
        return arn

    def register_pod(self, pod: Mapping[str, Any], product: ProductKey) -> VerifiedSignature:
        """TokenRequest bound to the pod -> STS web identity -> RegisterUsage(nonce = pod uid) -> verify.

        Raises MeteringError (AWS), RegistrationSetupError, ApiException, SignatureError.
        """
        meta = pod.get("metadata", {})
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        sa_name = pod.get("spec", {}).get("serviceAccountName") or "default"
        role_arn = self.role_arn(namespace, sa_name)
        if not role_arn:
            raise RegistrationSetupError(
                "MissingRoleArn",
                f"service account {namespace}/{sa_name} has no {ROLE_ARN_ANNOTATION} annotation "
                "(IRSA): the pod cannot register with its own identity",
            )

        def mint() -> str:
            return request_pod_token(
                self.api,
                namespace=namespace,
                service_account=sa_name,
                pod_name=name,
                pod_uid=uid,
                expiration_seconds=self.token_expiration_seconds,
                raw=self.pods.raw,
            )

        creds = self.credentials.get(role_arn, uid, mint)
        return register(self.factory.for_credentials(creds), product, nonce=uid)

    def register_cluster(self, product: ProductKey, nonce: str) -> VerifiedSignature:
        """One RegisterUsage as the operator itself (its own IRSA identity), nonce = kube-system uid."""
        return register(self.factory.default(), product, nonce=nonce)
