"""The shared pod cache against the real API server: one watch per namespace, selected pods only.

What a server-side filtered watch per product used to give each subscriber -- its pods listed, then
their changes, and a deletion when a pod's labels stop matching -- now comes from one list + watch
of the whole namespace, which keeps no pod that no subscriber selects.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from kubernetes import client

from metering_operator.domain.cached_pod import CachedPod
from metering_operator.domain.product import LabelSelector
from metering_operator.kube import podcache
from metering_operator.kube.podcache import PodCache
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

    # A new selector: the namespace is listed again for it; the others get no second listing.
    third = Recorder()
    others = cache.subscribe(namespace, LabelSelector(match_labels={"app": "other"}), third)
    assert others.synced.wait(30)
    assert third.listings == [{"db-0", "other-1", "other-2", "other-3", "other-4"}]
    assert cache.stats()["relists"] == relists + 1
    assert first.listings == [{"db-0", "db-1", "db-2"}]
    assert cache.threads() == [thread]  # still the one watch

    # Leaving: the "other" pods go with their last subscriber, the thread with the namespace's last.
    others.close()
    assert cache.stats()["pods"] == 2
    sub.close()
    assert thread.is_alive()
    again.close()
    wait_for("the namespace's watch thread to end", lambda: not thread.is_alive(), RELEASE_SECONDS)
    assert cache.stats() == {"namespaces": 0, "selectors": 0, "pods": 0, "events": 0, "relists": 0}
