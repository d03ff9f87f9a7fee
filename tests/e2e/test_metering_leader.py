"""Lease-based leader election against the real API server: exactly one leader at a time."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from metering_operator.kube.leader import LeaseElector

pytestmark = pytest.mark.cluster


@pytest.fixture
def electors(kube: client.ApiClient, namespace: str) -> Iterator[list[LeaseElector]]:
    made: list[LeaseElector] = []
    yield made
    for elector in made:
        elector.stop(release=False)


def new(kube: client.ApiClient, namespace: str, identity: str, made: list[LeaseElector]) -> LeaseElector:
    elector = LeaseElector(kube, namespace, "leader-test", identity, duration_seconds=2.0)
    made.append(elector)
    return elector


def test_one_round_one_leader(kube: client.ApiClient, namespace: str, electors: list[LeaseElector]) -> None:
    a, b = new(kube, namespace, "a", electors), new(kube, namespace, "b", electors)
    assert a.try_acquire_or_renew() is True
    assert b.try_acquire_or_renew() is False
    assert a.try_acquire_or_renew() is True  # renewing keeps it
    lease = client.CoordinationV1Api(kube).read_namespaced_lease("leader-test", namespace)
    assert lease.spec.holder_identity == "a"
    assert (a.is_leader(), b.is_leader()) == (True, False)


def test_takeover_only_after_the_lease_expires(
    kube: client.ApiClient, namespace: str, electors: list[LeaseElector]
) -> None:
    a, b = new(kube, namespace, "a", electors), new(kube, namespace, "b", electors)
    assert a.try_acquire_or_renew()
    # a dies without releasing (SIGKILL): b must wait out the 2 s lease, not take over at once
    assert b.try_acquire_or_renew() is False
    time.sleep(2.2)
    assert b.try_acquire_or_renew() is True
    # a's own view lapsed too (it leads for 2/3 of the lease after its last renewal)
    assert a.is_leader() is False
    assert a.try_acquire_or_renew() is False
    lease = client.CoordinationV1Api(kube).read_namespaced_lease("leader-test", namespace)
    assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("b", 1)


def test_release_hands_over_immediately(
    kube: client.ApiClient, namespace: str, electors: list[LeaseElector]
) -> None:
    a, b = new(kube, namespace, "a", electors), new(kube, namespace, "b", electors)
    assert a.try_acquire_or_renew()
    a.stop(release=True)
    assert b.try_acquire_or_renew() is True


def test_background_loops_never_lead_together(
    kube: client.ApiClient, namespace: str, electors: list[LeaseElector]
) -> None:
    group = [new(kube, namespace, f"op-{i}", electors) for i in range(3)]
    for elector in group:
        elector.start()
    assert any(e.wait_for_leadership(10) for e in group)
    overlaps = 0
    leaders_seen: set[str] = set()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        leading = [e.identity for e in group if e.is_leader()]
        overlaps += len(leading) > 1
        leaders_seen.update(leading)
        time.sleep(0.02)
    assert overlaps == 0
    assert len(leaders_seen) == 1  # healthy renewals: no flapping
    # stop the leader without releasing: another one takes over within the lease duration
    leader = next(e for e in group if e.is_leader())
    leader.stop(release=False)
    others = [e for e in group if e is not leader]
    deadline = time.monotonic() + 10
    while not any(e.is_leader() for e in others) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(e.is_leader() for e in others) == 1


def test_a_replica_whose_clock_runs_fast_waits_for_the_lease_on_its_monotonic_clock(
    kube: client.ApiClient, namespace: str, electors: list[LeaseElector]
) -> None:
    """b's wall clock runs 20 s ahead: a's renewTime looks 18 s stale to it. Expiry is judged
    from when b saw the record change, on b's monotonic clock, so b waits while a renews, and
    takes over one lease duration after a stops."""
    a = new(kube, namespace, "a", electors)
    seen: list[datetime] = []
    b = LeaseElector(
        kube,
        namespace,
        "leader-test",
        "b",
        duration_seconds=2.0,
        now=lambda: datetime.now(UTC) + timedelta(seconds=20),
        on_server_time=lambda when, _: seen.append(when),
    )
    electors.append(b)
    assert a.try_acquire_or_renew()
    for _ in range(6):  # 3 s of a renewing every 0.5 s: longer than the lease
        assert b.try_acquire_or_renew() is False
        time.sleep(0.5)
        assert a.try_acquire_or_renew() is True
    # the API server's Date was handed over on each read (the metering clock's reference)
    assert seen
    assert abs(seen[-1] - datetime.now(UTC)) < timedelta(seconds=5)
    # a stops renewing: b has seen no change since its last read; after 2 s it may take over
    assert b.try_acquire_or_renew() is False
    time.sleep(2.2)
    assert b.try_acquire_or_renew() is True
    assert a.is_leader() is False
