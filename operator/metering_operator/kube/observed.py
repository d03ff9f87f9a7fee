"""Watched, indexed views of each metered product's pods and workloads (no list per sample).

Sampling every minute must not list pods every minute, nor hold every pod of the cluster in
memory. Each product namespace gets:

* pods: a subscription per product to the namespace's shared pod cache
  (:mod:`metering_operator.kube.podcache`: one list + watch per namespace, shared with the
  entitlement gate, keeping only the compact copies of the pods some product selects);
* one informer per workload kind (Deployments, StatefulSets, DaemonSets) in that namespace:
  workloads are selected by their *pod template's* labels, which the API server cannot filter
  on, but a namespace holds few of them.

An informer is the classic list-then-watch loop (paginated list, resume from the last
resourceVersion, relist on 410 Gone) running in a daemon thread, keeping only the compact
``WorkloadView`` per object, built from the raw JSON (``_preload_content=False``) so no heavy client
model objects are created. Subscriptions and informers are shared by the products that use them:
each call names the product (its ``namespace/name``), and :meth:`ObservedIndex.release` -- called
when the product is deleted or stops metering -- drops the product's pod subscription (the
namespace's watch ends with its last subscriber) and stops every informer no other product uses,
cutting its blocked watch short (:class:`~metering_operator.kube.watch.WatchStream`), so its
thread and connection end at once.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from kubernetes import client

from metering_operator.domain.product import LabelSelector
from metering_operator.domain.sampling import PodView, WorkloadView, workload_view
from metering_operator.domain.selectors import to_query
from metering_operator.kube.podcache import NotSynced as NotSynced  # re-exported for the cycle
from metering_operator.kube.podcache import PodCache, Subscription
from metering_operator.kube.watch import WatchExpired, WatchStream

log = logging.getLogger(__name__)
V = TypeVar("V")
WATCH_TIMEOUT_SECONDS = 240
SYNC_TIMEOUT_SECONDS = 30.0
LIST_PAGE_SIZE = 500


class Informer(Generic[V]):
    """List + watch one resource collection and keep a view per object, keyed by uid."""

    def __init__(
        self,
        name: str,
        list_fn: Callable[..., Any],
        list_kwargs: Mapping[str, Any],
        view: Callable[[Mapping[str, Any]], V],
    ) -> None:
        self.name = name
        self._list_fn = list_fn
        self._kwargs = dict(list_kwargs)
        self._view = view
        self._items: dict[str, V] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stream = WatchStream()
        self.synced = threading.Event()
        self.relists = 0
        self.events = 0
        self.thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._stream.close()

    def size(self) -> int:
        with self._lock:
            return len(self._items)

    def snapshot(self, timeout: float = SYNC_TIMEOUT_SECONDS) -> list[V]:
        if not self.synced.wait(timeout):
            raise NotSynced(f"informer {self.name} has not synced within {timeout:.0f}s")
        with self._lock:
            return list(self._items.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                version = self._list()
                while not self._stop.is_set() and version:
                    version = self._watch(version)
            except WatchExpired:
                continue  # too old: start over from a fresh list
            except Exception as exc:  # network trouble, API server restart: back off and relist
                log.warning("informer %s: %s; relisting", self.name, exc)
                self._stop.wait(1.0)

    def _list(self) -> str:
        items: dict[str, V] = {}
        token: str | None = None
        while True:
            paging: dict[str, Any] = {"limit": LIST_PAGE_SIZE}
            if token:
                paging["_continue"] = token
            response = self._list_fn(**self._kwargs, **paging, _preload_content=False, _request_timeout=60)
            data = json.loads(response.data)
            response.release_conn()
            for item in data.get("items") or []:
                items[item["metadata"]["uid"]] = self._view(item)
            token = (data.get("metadata") or {}).get("continue")
            if not token:
                break
        with self._lock:
            self._items = items
        self.relists += 1
        self.synced.set()
        return str(data["metadata"]["resourceVersion"])

    def _watch(self, since: str) -> str:
        """Follow changes from ``since``; returns the version to resume from, "" when stopped."""
        version = since
        for kind, obj in self._stream.events(
            self._list_fn, WATCH_TIMEOUT_SECONDS, **self._kwargs, resource_version=since
        ):
            meta = obj.get("metadata") or {}
            version = str(meta.get("resourceVersion") or version)
            if kind == "BOOKMARK":
                continue
            self.events += 1
            uid = str(meta.get("uid") or "")
            with self._lock:
                if kind == "DELETED":
                    self._items.pop(uid, None)
                else:
                    self._items[uid] = self._view(obj)
        return "" if self._stop.is_set() else version


class ObservedIndex:
    """Pods from the shared cache and workload informers, released with the products."""

    def __init__(self, api: client.ApiClient, cache: PodCache | None = None) -> None:
        self.apps = client.AppsV1Api(api)
        self.cache = cache if cache is not None else PodCache(api)
        self._lock = threading.Lock()
        #: product -> its pod subscription (one selector per product)
        self._pods: dict[str, Subscription] = {}
        # key -> (informer, the products using it)
        self._workloads: dict[tuple[str, str], tuple[Informer[WorkloadView], set[str]]] = {}

    def pods(
        self, product: str, namespace: str, selector: LabelSelector, timeout: float = SYNC_TIMEOUT_SECONDS
    ) -> list[PodView]:
        """The pods ``selector`` selects in ``namespace``, on behalf of ``product``."""
        with self._lock:
            sub = self._pods.get(product)
            if sub is None or sub.namespace != namespace or sub.key != to_query(selector):
                old, sub = sub, self.cache.subscribe(namespace, selector)
                self._pods[product] = sub
                if old is not None:
                    old.close()  # after subscribing anew: the namespace's watch is kept, not restarted
        return [pod.view for pod in sub.snapshot(timeout)]

    def workloads(
        self, product: str, namespace: str, timeout: float = SYNC_TIMEOUT_SECONDS
    ) -> list[WorkloadView]:
        """Deployments, StatefulSets and DaemonSets of ``namespace``, on behalf of ``product``."""
        kinds: dict[str, Callable[..., Any]] = {
            "Deployment": self.apps.list_namespaced_deployment,
            "StatefulSet": self.apps.list_namespaced_stateful_set,
            "DaemonSet": self.apps.list_namespaced_daemon_set,
        }
        informers: list[Informer[WorkloadView]] = []
        with self._lock:
            for kind, list_fn in kinds.items():
                key = (namespace, kind)
                entry = self._workloads.get(key)
                if entry is None:
                    informer: Informer[WorkloadView] = Informer(
                        f"{kind}/{namespace}",
                        list_fn,
                        {"namespace": namespace},
                        lambda obj, kind=kind: workload_view(obj, kind),  # type: ignore[misc]
                    )
                    informer.start()
                    entry = self._workloads[key] = (informer, set())
                entry[1].add(product)
                informers.append(entry[0])
        views: list[WorkloadView] = []
        for informer in informers:
            views.extend(informer.snapshot(timeout))
        return views

    def release(self, product: str) -> None:
        """``product`` no longer samples: stop the informers nobody else uses."""
        with self._lock:
            sub = self._pods.pop(product, None)
            if sub is not None:
                sub.close()
            self._drop_user(self._workloads, product)

    @staticmethod
    def _drop_user(
        registry: dict[tuple[str, str], tuple[Informer[Any], set[str]]],
        product: str,
        keep: tuple[str, str] | None = None,
    ) -> None:
        for key in [k for k, (_, users) in registry.items() if product in users and k != keep]:
            informer, users = registry[key]
            users.discard(product)
            if not users:
                del registry[key]
                informer.stop()

    def _informers(self) -> list[Informer[Any]]:
        with self._lock:
            return [entry[0] for entry in self._workloads.values()]

    def threads(self) -> list[threading.Thread]:
        """The pod cache's namespace threads, then the workload informers' (tests prove a released
        one ends)."""
        return self.cache.threads() + [i.thread for i in self._informers()]

    def stats(self) -> dict[str, int]:
        informers = self._informers()
        pods = self.cache.stats()
        return {
            "pod_subscriptions": len(self._pods),
            "pod_namespaces": pods["namespaces"],
            "pods": pods["pods"],
            "informers": len(informers),
            "objects": sum(i.size() for i in informers),
            "events": sum(i.events for i in informers),
            "relists": sum(i.relists for i in informers),
        }
