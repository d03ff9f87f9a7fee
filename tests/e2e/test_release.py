"""Per-product watches end with the product, and Ready judges the Metering condition.

Focused tests of the operator's own Kubernetes machinery against the real API server, in this
process (so its threads can be counted): the metering informers
(:class:`~metering_operator.kube.observed.ObservedIndex`) and the entitlement gate's
:class:`~metering_operator.gate.controller.ProductController`, both on the namespace's shared pod
cache (:mod:`metering_operator.kube.podcache`); the controller is stepped by the
:class:`~metering_operator.gate.scheduler.Scheduler` (no thread of its own) and told of product
changes by a watch, as kopf's event handler does. A watch blocks in a socket read for up to its
server-side timeout (240 s); each test gives
a released thread :data:`RELEASE_SECONDS`, far less, so a stop flag that is merely checked
between events would fail them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from kubernetes import client
from kubernetes import watch as kwatch

from metering_operator.domain.clock import SystemClock
from metering_operator.domain.product import GROUP, PLURAL, VERSION, LabelSelector
from metering_operator.gate.controller import BODY_CHANGED, ProductController
from metering_operator.gate.registrar import Registrar
from metering_operator.gate.runtime import GateRuntime
from metering_operator.gate.scheduler import Scheduler
from metering_operator.kube.events import EventPoster
from metering_operator.kube.observed import ObservedIndex
from metering_operator.kube.pods import PodApi
from metering_operator.kube.records import DenialRecords
from tests.e2e.conftest import TEST_REGION, wait_for
from tests.e2e.test_metering import VCPU_DIM
from tests.e2e.test_metering import product as metered_product

pytestmark = pytest.mark.cluster

RELEASE_SECONDS = 5.0


def all_ended(threads: list[threading.Thread]) -> bool:
    return not any(t.is_alive() for t in threads)


# --- metering informers --------------------------------------------------------------------------------


def test_informers_end_with_the_last_product_that_uses_them(kube: client.ApiClient, namespace: str) -> None:
    index = ObservedIndex(kube)
    db = LabelSelector(match_labels={"app": "db"})
    a, b = f"{namespace}/a", f"{namespace}/b"
    assert index.pods(a, namespace, db) == []
    assert index.pods(b, namespace, db) == []  # same namespace: the same pod watch, not a second one
    assert index.workloads(a, namespace) == []
    pod_thread, *workload_threads = index.threads()
    assert pod_thread.name == f"pods-{namespace}"  # the namespace's shared pod cache
    assert len(workload_threads) == 3  # Deployments, StatefulSets, DaemonSets
    assert all(t.is_alive() for t in index.threads())
    assert index.stats()["informers"] == 3
    assert index.stats()["pod_namespaces"] == 1

    index.release(a)  # b still samples the pods; nobody needs the workloads any more
    wait_for("the workload informers' threads to end", lambda: all_ended(workload_threads), RELEASE_SECONDS)
    assert index.threads() == [pod_thread]
    assert pod_thread.is_alive()

    # b's selector changes: the namespace's one pod watch serves the new selector (no new thread)
    index.pods(b, namespace, LabelSelector(match_labels={"app": "web"}))
    assert index.threads() == [pod_thread]
    assert index.stats()["pod_subscriptions"] == 1

    index.release(b)
    wait_for("every informer thread to end", lambda: all_ended([pod_thread]), RELEASE_SECONDS)
    assert index.threads() == []
    assert index.stats() == {
        "pod_subscriptions": 0,
        "pod_namespaces": 0,
        "pods": 0,
        "informers": 0,
        "objects": 0,
        "events": 0,
        "relists": 0,
    }
    index.release(b)  # releasing twice is harmless


# --- the gate's product controller ---------------------------------------------------------------------


@pytest.fixture
def gate_runtime(kube: client.ApiClient) -> Iterator[GateRuntime]:
    pods = PodApi(kube)
    clock = SystemClock()
    aws_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="test-gate-aws")
    kube_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-gate-kube")
    # Entitlement mode Off below: the registrar is never called, so no AWS endpoint is needed.
    runtime = GateRuntime(
        api=kube,
        pods=pods,
        events=EventPoster(kube),
        registrar=Registrar(kube, pods, TEST_REGION, clock),
        aws_pool=aws_pool,
        kube_pool=kube_pool,
        clock=clock,
        trusted_product_codes=frozenset(),
        records=DenialRecords(kube, "default"),
    )
    yield runtime
    runtime.scheduler.stop()
    for pool in (aws_pool, kube_pool):
        pool.shutdown(wait=True, cancel_futures=True)


def metered_only_product(kube: client.ApiClient, namespace: str) -> None:
    """Entitlement Off, no public key, one dimension (named "db", like the metering tests')."""
    body = metered_product([VCPU_DIM])
    client.CustomObjectsApi(kube).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def conditions(kube: client.ApiClient, namespace: str) -> dict[str, dict[str, Any]]:
    obj = client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "db")
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}


def ready_is(kube: client.ApiClient, namespace: str, status: str, reason: str) -> Callable[[], bool]:
    def probe() -> bool:
        ready = conditions(kube, namespace).get("Ready") or {}
        return (ready.get("status"), ready.get("reason")) == (status, reason)

    return probe


def write_metering_condition(kube: client.ApiClient, namespace: str, status: str, reason: str) -> None:
    """What the metering side writes (it owns this condition; the gate only reads it)."""
    custom = client.CustomObjectsApi(kube)
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "db")
    current = (obj.get("status") or {}).get("conditions") or []
    others = [c for c in current if c["type"] != "Metering"]
    metering = {
        "type": "Metering",
        "status": status,
        "reason": reason,
        "message": f"dimension vcpu: {reason}",
        "observedGeneration": obj["metadata"]["generation"],
        "lastTransitionTime": "2031-03-04T10:00:00Z",
    }
    obj["status"] = {**(obj.get("status") or {}), "conditions": [*others, metering]}
    custom.replace_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "db", obj)


class ProductWatch:
    """What kopf does for the operator: watch the MeteredProduct, keep its latest body, and push
    each change to its controller (the controller reads the body only when told)."""

    def __init__(self, kube: client.ApiClient, namespace: str, name: str, scheduler: Scheduler) -> None:
        self.custom = client.CustomObjectsApi(kube)
        self.namespace, self.name, self.scheduler = namespace, name, scheduler
        self.latest: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
        self.pushed = 0
        self.stopped = False
        self._watch = kwatch.Watch()
        self._thread = threading.Thread(target=self._run, name="test-product-watch", daemon=True)
        self._thread.start()

    def body(self) -> dict[str, Any]:
        return self.latest

    def _run(self) -> None:
        stream = self._watch.stream(
            self.custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            field_selector=f"metadata.name={self.name}",
            resource_version=self.latest["metadata"]["resourceVersion"],
            timeout_seconds=60,
        )
        try:
            for event in stream:
                if event["type"] in ("ADDED", "MODIFIED"):
                    self.latest = event["object"]
                    self.pushed += 1
                    self.scheduler.post_to(("gate", self.namespace, self.name), BODY_CHANGED)
        except Exception:
            if not self.stopped:
                raise

    def stop(self) -> None:
        self.stopped = True
        self._watch.stop()


def test_gate_ready_follows_metering_and_its_watch_ends_with_the_product(
    kube: client.ApiClient,
    namespace: str,
    metered_product_crd: dict[str, Any],
    gate_runtime: GateRuntime,
) -> None:
    metered_only_product(kube, namespace)
    scheduler = gate_runtime.scheduler
    product = ProductWatch(kube, namespace, "db", scheduler)
    controller = ProductController(gate_runtime, namespace, "db", product.body)
    scheduler.add(controller, ("gate", namespace, "db")).result(5)
    watch: list[threading.Thread] = []
    try:
        # Metering-only product (entitlement Off, no public key): Ready from configuration.
        wait_for("Ready=True/Configured", ready_is(kube, namespace, "True", "Configured"))
        # No thread of the product's own: the process's one scheduler thread steps it...
        names = [t.name for t in threading.enumerate()]
        assert names.count("gate-scheduler") == 1
        assert not [n for n in names if n.startswith(f"gate-{namespace}")]
        # ...and its pods come from the namespace's shared pod cache: its one watch thread.
        watch.extend(t for t in threading.enumerate() if t.name == f"pods-{namespace}")
        assert len(watch) == 1
        assert watch[0].is_alive()

        # The Metering condition's changes are pushed (the product is not polled).
        pushed = product.pushed
        write_metering_condition(kube, namespace, "False", "DimensionRejected")
        wait_for("Ready=False/DimensionRejected", ready_is(kube, namespace, "False", "DimensionRejected"))
        assert product.pushed > pushed
        assert "vcpu" in conditions(kube, namespace)["Ready"]["message"]
        write_metering_condition(kube, namespace, "False", "SendFailing")  # transient: still Ready
        wait_for("Ready=True again", ready_is(kube, namespace, "True", "Configured"))
        assert conditions(kube, namespace)["Metering"]["reason"] == "SendFailing"  # left alone
    finally:
        product.stop()
        client.CustomObjectsApi(kube).delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "db")
        removed = scheduler.remove(controller)  # what the kopf daemon does when the product is deleted
        removed.result(RELEASE_SECONDS)
    assert scheduler.pending(controller) == 0  # its timers went with it
    wait_for("the pod watch thread to end", lambda: all_ended(watch), RELEASE_SECONDS)
