"""What the entitlement gate's parts share: the product as the gate sees it, and the runtime.

:class:`ProductInfo` is one parsed, checked snapshot of a MeteredProduct (spec, trust, loaded
public key); :class:`GateRuntime` holds the clients, the worker pools and the settings that every
product controller shares.

Two pools, so that one kind of work never waits behind the other: ``aws_pool`` runs single
RegisterUsage attempts (TokenRequest, STS, RegisterUsage -- seconds when AWS is slow), and
``kube_pool`` runs pod writes, evictions, Events, status writes and workload summaries (each one
Kubernetes call). Neither ever sleeps: retries are timers of the products' state machines.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from kubernetes import client

from metering_operator.domain.clock import Clock
from metering_operator.domain.entitlement import UngatedPodAction
from metering_operator.domain.product import (
    API_VERSION,
    KIND,
    EntitlementMode,
    EntitlementScope,
    MeteredProductSpec,
)
from metering_operator.domain.selectors import to_query
from metering_operator.domain.signature import ProductKey
from metering_operator.gate.registrar import Registrar
from metering_operator.kube.events import EventPoster
from metering_operator.kube.pods import PodApi
from metering_operator.kube.records import DenialRecords


@dataclass(frozen=True)
class ProductInfo:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: MeteredProductSpec
    trusted: bool
    public_key: RSAPublicKey | None
    key_error: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def mode(self) -> EntitlementMode:
        return self.spec.entitlement.mode

    @property
    def cluster_scope(self) -> bool:
        return self.spec.entitlement.scope is EntitlementScope.CLUSTER

    @property
    def selector(self) -> str:
        return to_query(self.spec.selector)

    @property
    def active(self) -> bool:
        """Whether pods are handled at all (trusted, key usable, mode not Off)."""
        return self.trusted and self.public_key is not None and self.mode is not EntitlementMode.OFF

    def product_key(self) -> ProductKey:
        assert self.public_key is not None
        return ProductKey(self.spec.product_code, self.spec.public_key_version, self.public_key)

    def ref(self) -> dict[str, str]:
        return {
            "kind": KIND,
            "apiVersion": API_VERSION,
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
        }


@dataclass
class GateRuntime:
    """What every product controller shares: clients, the worker pools, settings."""

    api: client.ApiClient
    pods: PodApi
    events: EventPoster
    registrar: Registrar
    aws_pool: ThreadPoolExecutor
    kube_pool: ThreadPoolExecutor
    clock: Clock
    trusted_product_codes: frozenset[str]
    records: DenialRecords
    ungated_pod_action: UngatedPodAction = UngatedPodAction.EVICT
    post_grant_events: bool = True
    _kube_system_uid: str | None = None

    def kube_system_uid(self) -> str:
        if self._kube_system_uid is None:
            ns = client.CoreV1Api(self.api).read_namespace("kube-system")
            self._kube_system_uid = str(ns.metadata.uid)
        return self._kube_system_uid

    def shutdown(self) -> None:
        for pool in (self.aws_pool, self.kube_pool):
            pool.shutdown(wait=False, cancel_futures=True)
