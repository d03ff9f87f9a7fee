"""The shared pod cache against the real API server: one watch per namespace, selected pods only.

What a server-side filtered watch per product used to give each subscriber -- its pods listed, then
their changes, and a deletion when a pod's labels stop matching -- now comes from one list + watch
of the whole namespace, which keeps no pod that no subscriber selects.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import pytest
from kubernetes import client

from metering_operator.domain import entitlement as ent
from metering_operator.domain.cached_pod import CachedPod
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    EntitlementState,
    LabelSelector,
)
from metering_operator.kube import podcache
from metering_operator.kube.podcache import PodCache, Subscription
from metering_operator.kube.pods import PodApi
from tests.e2e.conftest import wait_for

pytestmark = pytest.mark.cluster

RELEASE_SECONDS = 5.0


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.listings: list[set[str]] = []
        self.seen: list[tuple[str, str]] = []  # (what, pod name)

    def listed(self, pods: list[CachedPod]) -> None:
        with self.lock:
            self.listings.append({p.view.name for p in pods})

    def updated(self, pod: CachedPod) -> None:
        with self.lock:
            self.seen.append(("updated", pod.view.name))

    def deleted(self, pod: CachedPod) -> None:
        with self.lock:
            self.seen.append(("deleted", pod.view.name))

    def saw(self, what: str, name: str) -> bool:
        with self.lock:
            return (what, name) in self.seen


def make_pod(core: client.CoreV1Api, namespace: str, name: str, app: str) -> None:
    body = {
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/none"}]},
    }
    core.create_namespaced_pod(namespace, body)


def relabel(core: client.CoreV1Api, namespace: str, name: str, app: str) -> None:
    core.patch_namespaced_pod(name, namespace, {"metadata": {"labels": {"app": app}}})


@pytest.fixture
def cache(kube: client.ApiClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[PodCache]:
    monkeypatch.setattr(podcache, "PAGE_SIZE", 2)  # the list is paginated: several pages here
    pods = PodCache(kube)
    yield pods
    pods.stop()


def test_one_watch_serves_every_selector_and_keeps_only_selected_pods(
    kube: client.ApiClient, namespace: str, cache: PodCache
) -> None:
    core = client.CoreV1Api(kube)
    for i in range(3):
        make_pod(core, namespace, f"db-{i}", "db")
    for i in range(5):
        make_pod(core, namespace, f"other-{i}", "other")
    db = LabelSelector(match_labels={"app": "db"})

    first = Recorder()
    sub = cache.subscribe(namespace, db, first)
    assert sub.synced.wait(30)
    assert first.listings == [{"db-0", "db-1", "db-2"}]
    assert {p.view.name for p in sub.snapshot()} == {"db-0", "db-1", "db-2"}
    assert cache.stats()["pods"] == 3  # the five unselected pods were dropped as they were read
    (thread,) = cache.threads()
    assert thread.name == f"pods-{namespace}"

    # What a filtered watch would say: a pod whose labels stop matching is deleted for the subscriber.
    relabel(core, namespace, "db-0", "other")
    wait_for("db-0 deleted for the db subscriber", lambda: first.saw("deleted", "db-0"))
    relabel(core, namespace, "other-0", "db")
    wait_for("other-0 added for the db subscriber", lambda: first.saw("updated", "other-0"))
    core.delete_namespaced_pod("db-1", namespace, grace_period_seconds=0)
    wait_for("db-1 deleted", lambda: first.saw("deleted", "db-1"))
    assert cache.stats()["pods"] == 2  # db-2 and other-0
    assert not first.saw("updated", "other-1")  # never selected: never told

    # The same selector again: served from memory at once, no list.
    relists = cache.stats()["relists"]
    second = Recorder()
    again = cache.subscribe(namespace, db, second)
    assert again.synced.is_set()
    assert second.listings == [{"db-2", "other-0"}]
    assert cache.stats()["relists"] == relists

    # A new selector: its pods are listed by the API server's label selector at the store's
    # resourceVersion (no relist of the namespace); the others get no second listing.
    third = Recorder()
    others = cache.subscribe(namespace, LabelSelector(match_labels={"app": "other"}), third)
    assert others.synced.wait(30)
    assert third.listings == [{"db-0", "other-1", "other-2", "other-3", "other-4"}]
    assert cache.stats()["relists"] == relists
    assert cache.stats()["selector_lists"] == 1
    assert first.listings == [{"db-0", "db-1", "db-2"}]
    assert cache.threads() == [thread]  # still the one watch

    # Leaving: the "other" pods go with their last subscriber, the thread with the namespace's last.
    others.close()
    assert cache.stats()["pods"] == 2
    sub.close()
    assert thread.is_alive()
    again.close()
    wait_for("the namespace's watch thread to end", lambda: not thread.is_alive(), RELEASE_SECONDS)
    assert cache.stats() == {
        "namespaces": 0,
        "selectors": 0,
        "pods": 0,
        "events": 0,
        "unchanged": 0,
        "relists": 0,
        "selector_lists": 0,
    }


class Ticks:
    """The cache's monotonic clock, moved only by the test: a coalescing window ends when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def past_the_window(self) -> None:
        self.now += podcache.COALESCE_MAX_SECONDS + 1


class PausedList:
    """The real API server's list, held after its first page until the test lets it go on."""

    def __init__(self, cache: PodCache) -> None:
        self.reading = threading.Event()
        self.go = threading.Event()
        self.pages = 0
        real = cache.core.list_namespaced_pod

        def list_pods(namespace: str, **kwargs: object) -> object:
            if kwargs.get("_continue") and not self.go.is_set():
                self.reading.set()
                assert self.go.wait(30), "the test never let the list go on"
            self.pages += 1
            return real(namespace, **kwargs)

        cache.core.list_namespaced_pod = list_pods


@pytest.fixture
def ticks_cache(kube: client.ApiClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[PodCache, Ticks]]:
    monkeypatch.setattr(podcache, "PAGE_SIZE", 2)
    ticks = Ticks()
    pods = PodCache(kube, clock=ticks)
    yield pods, ticks
    pods.stop()


def test_subscriptions_arriving_together_share_one_list(
    kube: client.ApiClient, namespace: str, ticks_cache: tuple[PodCache, Ticks]
) -> None:
    cache, ticks = ticks_cache
    core = client.CoreV1Api(kube)
    apps = [f"app{i}" for i in range(5)]
    for app in apps:
        for i in range(2):
            make_pod(core, namespace, f"{app}-{i}", app)
    make_pod(core, namespace, "unselected", "nobody")
    for i in range(3):  # selected by nobody until later: dropped by the first list
        make_pod(core, namespace, f"late{i}-0", f"late{i}")

    recorders = {app: Recorder() for app in apps}
    subs = {
        app: cache.subscribe(namespace, LabelSelector(match_labels={"app": app}), recorders[app])
        for app in apps
    }
    # Inside the coalescing window nothing is listed: the five wait for one list together.
    assert not any(sub.synced.is_set() for sub in subs.values())
    assert cache.stats()["relists"] == 0
    ticks.past_the_window()
    for app, sub in subs.items():
        assert sub.synced.wait(30), app
        assert recorders[app].listings == [{f"{app}-0", f"{app}-1"}]
    assert cache.stats()["relists"] == 1  # one list of the namespace served all five selectors
    assert cache.stats()["pods"] == 10  # "unselected" and the late pods dropped as read

    # They are watched from that list on, each told only of its own pods.
    make_pod(core, namespace, "app3-new", "app3")
    wait_for("app3-new told to the app3 subscriber", lambda: recorders["app3"].saw("updated", "app3-new"))
    assert all(not r.saw("updated", "app3-new") for app, r in recorders.items() if app != "app3")

    # Three more selectors arriving together on the synced namespace: one round, in which each is
    # listed by its label selector at the store's version; the namespace is not listed again. Their
    # pods were dropped as unselected: they can only come from the API server.
    late = {f"late{i}": Recorder() for i in range(3)}
    late_subs = [
        cache.subscribe(namespace, LabelSelector(match_labels={"app": app}), rec) for app, rec in late.items()
    ]
    assert not any(sub.synced.is_set() for sub in late_subs)
    ticks.past_the_window()
    for sub in late_subs:
        assert sub.synced.wait(30)
    assert [r.listings for r in late.values()] == [[{f"late{i}-0"}] for i in range(3)]
    assert cache.stats()["relists"] == 1
    assert cache.stats()["selector_lists"] == 3
    assert all(r.listings == [{f"{app}-0", f"{app}-1"}] for app, r in recorders.items())
    assert all(not r.saw("updated", f"late{i}-0") for r in recorders.values() for i in range(3))
    relabel(core, namespace, "late0-0", "app0")  # and the watch goes on from where it was
    wait_for("late0-0 moved to app0", lambda: recorders["app0"].saw("updated", "late0-0"))
    wait_for("late0-0 left late0", lambda: late["late0"].saw("deleted", "late0-0"))


def test_a_list_serves_the_subscribers_that_were_there_when_it_started(
    kube: client.ApiClient, namespace: str, ticks_cache: tuple[PodCache, Ticks]
) -> None:
    cache, ticks = ticks_cache
    core = client.CoreV1Api(kube)
    for i in range(3):  # listed in name order, two a page: the "web" pods first
        make_pod(core, namespace, f"a-web-{i}", "web")
        make_pod(core, namespace, f"b-db-{i}", "db")
    paused = PausedList(cache)
    db, web = LabelSelector(match_labels={"app": "db"}), LabelSelector(match_labels={"app": "web"})

    first = Recorder()
    sub_db = cache.subscribe(namespace, db, first)
    ticks.past_the_window()
    assert paused.reading.wait(30)  # the list for "db" has read its first page and is held
    # A new selector comes in the middle of that list: its first page (two of its three pods) was
    # not filtered with it, so the list keeps only a-web-2 of its pods.
    second = Recorder()
    sub_web = cache.subscribe(namespace, web, second)
    paused.go.set()

    # The list serves "db" (there from its start) at once, not only after a second list for "web".
    assert sub_db.synced.wait(30)
    assert first.listings == [{"b-db-0", "b-db-1", "b-db-2"}]
    assert cache.stats()["relists"] == 1
    # "web" waits for a list of its own (its coalescing window has not ended: the clock is held),
    # and nothing is said to it meanwhile, though some of its pods are already kept.
    assert not sub_web.synced.is_set()
    assert second.listings == []
    assert second.seen == []
    # A subscriber of a selector already served is synced from memory at once, "web" pending or not.
    third = Recorder()
    again = cache.subscribe(namespace, db, third)
    assert again.synced.is_set()
    assert third.listings == [{"b-db-0", "b-db-1", "b-db-2"}]

    ticks.past_the_window()
    assert sub_web.synced.wait(30)
    assert second.listings == [{"a-web-0", "a-web-1", "a-web-2"}]  # complete: a list read every page
    assert cache.stats()["relists"] == 1  # listed by its label selector, not a second full list
    assert cache.stats()["selector_lists"] == 1
    assert first.listings == [{"b-db-0", "b-db-1", "b-db-2"}]  # the others get no second listing
    assert first.seen == []  # nor a spurious update: nothing changed between the two lists
    relabel(core, namespace, "a-web-0", "db")
    wait_for(
        "a-web-0 moved from web to db",
        lambda: first.saw("updated", "a-web-0") and second.saw("deleted", "a-web-0"),
    )


def test_a_new_selectors_version_gone_falls_back_to_a_full_list(
    kube: client.ApiClient, namespace: str, ticks_cache: tuple[PodCache, Ticks]
) -> None:
    cache, ticks = ticks_cache
    core = client.CoreV1Api(kube)
    make_pod(core, namespace, "db-0", "db")
    make_pod(core, namespace, "web-0", "web")
    db = cache.subscribe(namespace, LabelSelector(match_labels={"app": "db"}), Recorder())
    ticks.past_the_window()
    assert db.synced.wait(30)
    # The API server answers the new selector's list at the store's version with 410 Gone (the
    # version compacted away), once; every other call reaches it.
    real = cache.core.list_namespaced_pod
    gone: list[str] = []

    def list_pods(ns: str, **kwargs: object) -> object:
        if kwargs.get("resource_version_match") == "Exact" and not gone:
            gone.append(str(kwargs.get("resource_version")))
            raise client.ApiException(status=410, reason="Gone")
        return real(ns, **kwargs)

    cache.core.list_namespaced_pod = list_pods
    rec = Recorder()
    web = cache.subscribe(namespace, LabelSelector(match_labels={"app": "web"}), rec)
    ticks.past_the_window()
    assert web.synced.wait(30)
    assert gone  # the label-selector list was tried and refused
    assert rec.listings == [{"web-0"}]
    assert cache.stats()["relists"] == 2  # the fallback: the namespace listed again, as before


# --- what the gate is told ----------------------------------------------------------------------

FINALIZER = "example.com/test-hold"


class GateRecorder:
    """A listener keeping what it was told of each pod, as the gate's controller receives it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.told: list[tuple[str, CachedPod]] = []

    def listed(self, pods: list[CachedPod]) -> None:
        pass

    def updated(self, pod: CachedPod) -> None:
        with self.lock:
            self.told.append(("updated", pod))

    def deleted(self, pod: CachedPod) -> None:
        with self.lock:
            self.told.append(("deleted", pod))

    def of(self, name: str) -> list[tuple[str, CachedPod]]:
        with self.lock:
            return [(what, pod) for what, pod in self.told if pod.view.name == name]

    def last(self, name: str) -> CachedPod | None:
        told = self.of(name)
        return told[-1][1] if told else None


def cached(sub: Subscription, name: str) -> CachedPod | None:
    """The pod as the cache's store holds it now (every version goes there, told or not)."""
    return next((p for p in sub.snapshot() if p.view.name == name), None)


def version(pod: CachedPod | None) -> int:
    return int(pod.resource_version) if pod is not None else -1


def stored_at_least(sub: Subscription, name: str, rv: str) -> bool:
    """Whether the cache has applied the watch event of version ``rv`` (or a later one) of the pod:
    what it tells a listener about that event it has told by then (same thread, same lock)."""
    return version(cached(sub, name)) >= int(rv)


def gated_pod(name: str, gates: list[str]) -> dict[str, object]:
    return {
        "metadata": {"name": name, "labels": {"app": "db"}, "finalizers": [FINALIZER]},
        "spec": {
            "schedulingGates": [{"name": g} for g in gates],
            "containers": [{"name": "c", "image": "registry.invalid/none"}],
        },
    }


def test_the_gate_is_told_what_it_reads_and_not_the_pods_binding_or_running(
    kube: client.ApiClient, namespace: str, cache: PodCache
) -> None:
    """Once a pod is released, the scheduler binds it and KWOK marks it Running and Ready: new
    versions whose gate view is the same. They reach the store (metering sees the pod bound and
    ready) but not the gate; a change of what the gate reads -- a tampered annotation, its gate
    removed, a final phase, a deletion -- is told as before. A write guarded with the older version
    the gate then holds is refused once and decided again on the pod re-read."""
    core = client.CoreV1Api(kube)
    rec, tier = GateRecorder(), GateRecorder()
    sub = cache.subscribe(namespace, LabelSelector(match_labels={"app": "db"}), rec)
    tier_sub = cache.subscribe(namespace, LabelSelector(match_labels={"tier": "db"}), tier)
    assert sub.synced.wait(30)
    assert tier_sub.synced.wait(30)
    try:
        core.create_namespaced_pod(namespace, gated_pod("db-0", [SCHEDULING_GATE]))
        first = wait_for("db-0 told", lambda: rec.last("db-0"))
        assert ent.is_gated(first.gate)

        # Tampering with the operator's annotations is told (the gate judges signatures again).
        tampered = core.patch_namespaced_pod(
            "db-0", namespace, {"metadata": {"annotations": {ANNOTATION_SIGNATURE: "forged"}}}
        )
        told = wait_for(
            "the tampered signature told",
            lambda: (p := rec.last("db-0")) is not None and ent.annotated_signature(p.gate) == "forged" and p,
        )
        assert told.resource_version == tampered.metadata.resource_version

        # Someone else's annotation: a new version, the same gate view -- stored, not told.
        foreign = core.patch_namespaced_pod("db-0", namespace, {"metadata": {"annotations": {"team": "a"}}})
        wait_for(
            "the foreign annotation stored",
            lambda: stored_at_least(sub, "db-0", foreign.metadata.resource_version),
        )
        assert rec.last("db-0") is told

        # The gate removed (as the gate does when it grants) is told ...
        index = [g.name for g in foreign.spec.scheduling_gates].index(SCHEDULING_GATE)
        core.patch_namespaced_pod(
            "db-0", namespace, [{"op": "remove", "path": f"/spec/schedulingGates/{index}"}]
        )
        released: CachedPod = wait_for(
            "the release told", lambda: (p := rec.last("db-0")) is not None and not ent.is_gated(p.gate) and p
        )
        # ... then the scheduler binds the pod and KWOK runs it: metering's view sees both, the
        # gate is told neither.
        running = wait_for(
            "db-0 bound, Running and Ready in the store",
            lambda: (p := cached(sub, "db-0")) is not None and p.view.bound and p.view.ready and p,
        )
        assert version(running) > version(released)
        assert rec.last("db-0") is released
        assert [what for what, _ in rec.of("db-0")] == ["updated"] * 3
        assert cache.stats()["unchanged"] >= 3  # the foreign annotation, the binding, Running/Ready

        # A label making the pod join another selector: told to that selector's subscriber (a pod new
        # to it), not to the one that had it already (nothing it reads changed).
        joined = core.patch_namespaced_pod("db-0", namespace, {"metadata": {"labels": {"tier": "db"}}})
        told_tier: CachedPod = wait_for("db-0 told to the tier subscriber", lambda: tier.last("db-0"))
        assert told_tier.resource_version == joined.metadata.resource_version
        assert rec.last("db-0") is released

        # A write guarded with the version the gate holds (older than the pod's): refused once,
        # then decided again on the pod re-read, and written -- the path every raced write takes.
        pods = PodApi(kube)
        written = pods.write_with_retry(
            released.gate,
            lambda current: ent.state_patch(
                current, EntitlementState.DENIED, "Test: stale version", product_key=f"{namespace}/db"
            ),
        )
        assert written is not None
        assert pods.pod_writes >= 2  # refused at least once (its version was stale), then landed
        assert written["metadata"]["annotations"][ANNOTATION_ENTITLEMENT] == "Denied"
        assert written["spec"]["nodeName"]  # written on the pod as it is, bound
        told = wait_for(
            "the write told",
            lambda: (
                (p := rec.last("db-0")) is not None
                and ent.entitlement_state(p.gate) is EntitlementState.DENIED
                and p
            ),
        )
        assert told.resource_version == written["metadata"]["resourceVersion"]

        # A pod held by another gate (never bound: KWOK leaves it alone) failing is told: the gate
        # stops counting it ...
        core.create_namespaced_pod(namespace, gated_pod("db-1", ["example.com/other"]))
        wait_for("db-1 told", lambda: rec.last("db-1"))
        core.patch_namespaced_pod_status("db-1", namespace, {"status": {"phase": "Failed"}})
        wait_for(
            "the failure told", lambda: (p := rec.last("db-1")) is not None and ent.is_terminating(p.gate)
        )
        # ... and so is its deletion: first the deletionTimestamp (a finalizer holds it), then the end.
        core.delete_namespaced_pod("db-0", namespace)
        wait_for(
            "the deletionTimestamp told",
            lambda: (p := rec.last("db-0")) is not None and p.gate["metadata"].get("deletionTimestamp"),
        )
        with contextlib.suppress(client.ApiException):  # KWOK may have let it go already
            core.patch_namespaced_pod("db-0", namespace, {"metadata": {"finalizers": None}})
        wait_for("db-0 deleted", lambda: rec.of("db-0")[-1][0] == "deleted")
    finally:
        for name in ("db-0", "db-1"):
            with contextlib.suppress(client.ApiException):
                core.patch_namespaced_pod(name, namespace, {"metadata": {"finalizers": None}})
