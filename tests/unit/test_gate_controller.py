"""The gate's ProductController on the scheduler: pushed product changes, no polling, no thread.

The controller is driven through a :class:`~metering_operator.gate.scheduler.Scheduler` with
injected clocks (``run_once``: one wake-up's work), with fakes for what it hands to other threads:
the pod cache (the test plays its namespace thread) and the worker pools (the test runs the work
it chooses). Nothing sleeps and nothing talks to a cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.domain.clock import ManualClock
from metering_operator.domain.entitlement import UngatedPodAction
from metering_operator.domain.pins import Pins
from metering_operator.gate import controller as ctl
from metering_operator.gate import model as m
from metering_operator.gate.scheduler import Scheduler

T0 = datetime(2031, 3, 4, 10, 0, tzinfo=UTC)
CODE = "1fszvu527waovqeuhpkyx2b5d"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Pool:
    """Work handed to a pool, run when the test says."""

    def __init__(self) -> None:
        self.work: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self.work.append((fn, args))

    def run(self, name: str) -> int:
        """Run the queued work whose function is named ``name``; how many ran."""
        ran = [w for w in self.work if getattr(w[0], "__name__", "") == name]
        self.work = [w for w in self.work if w not in ran]
        for fn, args in ran:
            fn(*args)
        return len(ran)


class Cache:
    def __init__(self) -> None:
        self.subscriptions: list[Any] = []

    def subscribe(self, namespace: str, selector: Any, listener: Any) -> Any:
        sub = SimpleNamespace(listener=listener, selector=selector, closed=False)
        sub.close = lambda: setattr(sub, "closed", True)
        self.subscriptions.append(sub)
        return sub


@pytest.fixture(scope="module")
def pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


class World:
    def __init__(self, pem: str) -> None:
        self.mono = FakeMonotonic()
        self.clock = ManualClock(T0)
        self.sched = Scheduler(self.clock, monotonic=self.mono)
        self.kube_pool, self.aws_pool, self.cache = Pool(), Pool(), Cache()
        self.denial_reads = 0

        def load(namespace: str, name: str) -> dict[str, str]:
            self.denial_reads += 1
            return {}

        self.rt: Any = SimpleNamespace(
            scheduler=self.sched,
            clock=self.clock,
            ungated_pod_action=UngatedPodAction.EVICT,
            pins=Pins(),
            trusted_product_codes=frozenset(),
            kube_pool=self.kube_pool,
            aws_pool=self.aws_pool,
            records=SimpleNamespace(load=load, namespace="operator"),
            pod_cache=lambda: self.cache,
        )
        self.body: dict[str, Any] = {
            "metadata": {"name": "db", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": {
                "productCode": CODE,
                "publicKeyVersion": 1,
                "publicKey": {"pem": pem},
                "selector": {"matchLabels": {"app": "db"}},
            },
        }
        self.controller = ctl.ProductController(cast(Any, self.rt), "ns", "db", lambda: self.body)
        self.dispatched: list[Any] = []
        original = self.controller.dispatch

        def dispatch(message: m.Message) -> None:
            self.dispatched.append(message)
            original(message)

        self.controller.dispatch = dispatch  # type: ignore[method-assign]

    def status_writes(self) -> int:
        """Status writes handed to the kube pool, answered as done (what the API server would say)."""
        writes = [work for work in self.kube_pool.work if work[0].__name__ == "_apply_status"]
        self.kube_pool.work = [work for work in self.kube_pool.work if work not in writes]
        for _ in writes:
            self.sched.post(self.controller, (-1, True))
        return len(writes)

    def settle(self) -> None:
        """Run the scheduler until it has nothing left to do now."""
        while self.sched.run_once():
            pass


def test_an_idle_product_costs_no_timer_and_no_wake_up(pem: str) -> None:
    w = World(pem)
    w.sched._control(w.controller, add=True)
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged"]
    assert len(w.cache.subscriptions) == 1
    # The namespace's cache lists the product's pods (none): the denial record is read in the pool.
    w.cache.subscriptions[0].listener.listed([])
    w.settle()
    assert w.kube_pool.run("_read_denials") == 1
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged", "Listed"]
    # The coalesced status flush comes due FLUSH_INTERVAL_SECONDS after the last one.
    assert w.controller._flush_pending
    w.mono.now += ctl.FLUSH_INTERVAL_SECONDS
    w.settle()
    assert not w.controller._flush_pending
    assert w.status_writes() == 1  # the status write went to the kube pool; it answered
    w.settle()
    assert not w.controller._dirty
    # Nothing left to time: no poll of the product, no key refresh (the key is inline).
    assert w.sched.pending() == 0
    assert w.sched.next_wait() is None
    wakeups = w.sched.wakeups
    w.mono.now += 3600
    w.clock.advance(timedelta(hours=1))
    w.sched.run_once()
    assert w.sched.wakeups == wakeups + 1
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged", "Listed"]


def test_a_pushed_status_change_is_not_a_product_change_and_a_spec_change_is(pem: str) -> None:
    w = World(pem)
    w.sched._control(w.controller, add=True)
    w.settle()
    w.dispatched.clear()
    w.body["status"] = {"pods": {"granted": 0}}  # e.g. our own status write, seen by kopf's watch
    w.sched.post(w.controller, ctl.BODY_CHANGED)
    w.settle()
    assert w.dispatched == []
    w.body["spec"]["selector"] = {"matchLabels": {"app": "web"}}
    w.body["metadata"]["generation"] = 2
    w.sched.post(w.controller, ctl.BODY_CHANGED)
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged"]
    assert len(w.cache.subscriptions) == 2  # the new selector subscribed...
    assert w.cache.subscriptions[0].closed  # ...and the old one closed after it


def test_a_key_from_a_config_map_is_read_in_the_pool_and_refreshed(pem: str) -> None:
    w = World(pem)
    w.body["spec"]["publicKey"] = {"configMapKeyRef": {"name": "keys", "key": "pem"}}
    reads: list[str] = []

    def load_pem(source: Any) -> tuple[Any, str | None]:
        reads.append(source.config_map_key_ref.name)  # in the pool, never on the scheduler
        return None, "ConfigMap ns/keys has no key 'pem'"

    w.controller._load_pem = load_pem  # type: ignore[method-assign]
    w.sched._control(w.controller, add=True)
    w.settle()
    assert reads == []
    assert w.dispatched == []
    assert w.kube_pool.run("_read_product") == 1
    assert reads == ["keys"]
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged"]
    assert w.controller.state.info is not None
    assert w.controller.state.info.key_error == "ConfigMap ns/keys has no key 'pem'"
    # A minute on, the ConfigMap is read again (it can change without the product changing).
    w.mono.now += ctl.KEY_REFRESH_SECONDS
    w.settle()
    assert w.kube_pool.run("_read_product") == 1
    assert reads == ["keys", "keys"]


def test_pod_events_while_the_denial_record_is_read_wait_for_it(pem: str) -> None:
    w = World(pem)
    w.sched._control(w.controller, add=True)
    w.settle()
    listener = w.cache.subscriptions[0].listener
    listener.listed([])
    w.settle()
    pod = SimpleNamespace(uid="p1")
    listener.deleted(pod)  # comes before the denial record has been read
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged"]
    w.kube_pool.run("_read_denials")
    w.settle()
    assert [type(x).__name__ for x in w.dispatched] == ["ProductChanged", "Listed", "PodDeleted"]
