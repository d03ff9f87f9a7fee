"""What every product controller of the entitlement gate shares: the runtime.

:class:`GateRuntime` holds the clients, the worker pools, the scheduler that steps every product's
controller (:mod:`metering_operator.gate.scheduler`: one thread for all products) and the
settings. (The product as the gate sees it is :class:`metering_operator.gate.product.ProductInfo`.)

Two pools, so that one kind of work never waits behind the other: ``aws_pool`` runs single
RegisterUsage attempts (TokenRequest, STS, RegisterUsage -- seconds when AWS is slow), and
``kube_pool`` runs pod writes, evictions, Events, status writes and workload summaries (each one
Kubernetes call). Neither ever sleeps: retries are timers of the products' state machines.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from kubernetes import client

from metering_operator.domain.clock import Clock
from metering_operator.domain.entitlement import UngatedPodAction
from metering_operator.domain.pins import Pins
from metering_operator.gate.licensing import Licensing
from metering_operator.gate.registrar import Registrar
from metering_operator.gate.scheduler import Scheduler
from metering_operator.kube.events import EventPoster
from metering_operator.kube.podcache import PodCache
from metering_operator.kube.pods import PodApi
from metering_operator.kube.records import DenialRecords


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
    pins: Pins = field(default_factory=Pins)
    post_grant_events: bool = True
    #: The namespaces' shared pod cache (metering reads the same one); made on first use if not given.
    cache: PodCache | None = None
    #: Contract products' License Manager checkouts (None: not set up, e.g. in unit tests).
    licensing: Licensing | None = None
    _kube_system_uid: str | None = None
    #: The one scheduler thread of every product's controller (made on first use if not given).
    _scheduler: Scheduler | None = None

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(self.clock)
        return self._scheduler

    def pod_cache(self) -> PodCache:
        if self.cache is None:
            self.cache = PodCache(self.api)
        return self.cache

    def kube_system_uid(self) -> str:
        if self._kube_system_uid is None:
            ns = client.CoreV1Api(self.api).read_namespace("kube-system")
            self._kube_system_uid = str(ns.metadata.uid)
        return self._kube_system_uid

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()
        for pool in (self.aws_pool, self.kube_pool):
            pool.shutdown(wait=False, cancel_futures=True)
