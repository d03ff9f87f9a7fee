"""Watched, indexed views of each metered product's pods and workloads (no list per sample).

Sampling every minute must not list pods every minute, nor hold every pod of the cluster in
memory. Each product namespace gets:

* one pod informer per distinct label selector, with the selector sent to the API server
  (``labelSelector``), so only the product's own pods ever arrive;
* one informer per workload kind (Deployments, StatefulSets, DaemonSets) in that namespace:
  workloads are selected by their *pod template's* labels, which the API server cannot filter
  on, but a namespace holds few of them.

An informer is the classic list-then-watch loop (resume from the last resourceVersion, relist
on 410 Gone) running in a daemon thread, keeping only the compact
:class:`~metering_operator.domain.sampling.PodView` / ``WorkloadView`` per object, built from the
raw JSON (``_preload_content=False``) so no heavy client model objects are created.
Informers are shared and reference-counted by the products that use them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from metering_operator.domain.product import LabelSelector
from metering_operator.domain.sampling import PodView, WorkloadView, pod_view, workload_view
from metering_operator.domain.selectors import to_query

log = logging.getLogger(__name__)
V = TypeVar("V")
WATCH_TIMEOUT_SECONDS = 240
SYNC_TIMEOUT_SECONDS = 30.0


class NotSynced(RuntimeError):
    """The informer has not completed its first list yet."""


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
        self.synced = threading.Event()
        self.users = 0
        self.relists = 0
        self.events = 0
        self._thread = threading.Thread(target=self._run, name=f"informer-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

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
            except Exception as exc:  # network trouble, API server restart: back off and relist
                log.warning("informer %s: %s; relisting", self.name, exc)
                self._stop.wait(1.0)

    def _list(self) -> str:
        response = self._list_fn(**self._kwargs, _preload_content=False, _request_timeout=60)
        data = json.loads(response.data)
        items = {item["metadata"]["uid"]: self._view(item) for item in data.get("items") or []}
        with self._lock:
            self._items = items
        self.relists += 1
        self.synced.set()
        return str(data["metadata"]["resourceVersion"])

    def _watch(self, since: str) -> str:
        """Follow changes from ``since``; returns the version to resume from, "" to relist."""
        version = since
        response = self._list_fn(
            **self._kwargs,
            watch=True,
            resource_version=since,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            _preload_content=False,
            _request_timeout=WATCH_TIMEOUT_SECONDS + 30,
        )
        try:
            for line in iter_resp_lines(response):
                if self._stop.is_set():
                    return ""
                event = json.loads(line)
                kind = event.get("type")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:  # too old: start over from a fresh list
                        return ""
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
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
        finally:
            response.release_conn()
        return version


class ObservedIndex:
    """Shared informers for the products' namespaces and selectors."""

    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self._lock = threading.Lock()
        self._pods: dict[tuple[str, str], Informer[PodView]] = {}
        self._workloads: dict[tuple[str, str], Informer[WorkloadView]] = {}

    def _pod_informer(self, namespace: str, selector: LabelSelector) -> Informer[PodView]:
        query = to_query(selector)
        key = (namespace, query)
        with self._lock:
            informer = self._pods.get(key)
            if informer is None:
                kwargs: dict[str, Any] = {"namespace": namespace}
                if query:
                    kwargs["label_selector"] = query
                informer = Informer(
                    f"pods/{namespace}/{query}", self.core.list_namespaced_pod, kwargs, pod_view
                )
                informer.start()
                self._pods[key] = informer
            return informer

    def _workload_informers(self, namespace: str) -> list[Informer[WorkloadView]]:
        kinds: dict[str, Callable[..., Any]] = {
            "Deployment": self.apps.list_namespaced_deployment,
            "StatefulSet": self.apps.list_namespaced_stateful_set,
            "DaemonSet": self.apps.list_namespaced_daemon_set,
        }
        result = []
        with self._lock:
            for kind, list_fn in kinds.items():
                key = (namespace, kind)
                informer = self._workloads.get(key)
                if informer is None:
                    informer = Informer(
                        f"{kind}/{namespace}",
                        list_fn,
                        {"namespace": namespace},
                        lambda obj, kind=kind: workload_view(obj, kind),  # type: ignore[misc]
                    )
                    informer.start()
                    self._workloads[key] = informer
                result.append(informer)
        return result

    def pods(
        self, namespace: str, selector: LabelSelector, timeout: float = SYNC_TIMEOUT_SECONDS
    ) -> list[PodView]:
        return self._pod_informer(namespace, selector).snapshot(timeout)

    def workloads(self, namespace: str, timeout: float = SYNC_TIMEOUT_SECONDS) -> list[WorkloadView]:
        views: list[WorkloadView] = []
        for informer in self._workload_informers(namespace):
            views.extend(informer.snapshot(timeout))
        return views

    def forget(self, namespace: str, selector: LabelSelector, namespace_in_use: bool) -> None:
        """Stop the product's pod informer (and the namespace's workload ones if unused)."""
        with self._lock:
            informer = self._pods.pop((namespace, to_query(selector)), None)
            if informer is not None:
                informer.stop()
            if not namespace_in_use:
                for key in [k for k in self._workloads if k[0] == namespace]:
                    self._workloads.pop(key).stop()

    def stats(self) -> dict[str, int]:
        with self._lock:
            informers: list[Informer[Any]] = [*self._pods.values(), *self._workloads.values()]
        return {
            "informers": len(informers),
            "objects": sum(len(i._items) for i in informers),
            "events": sum(i.events for i in informers),
            "relists": sum(i.relists for i in informers),
        }


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
