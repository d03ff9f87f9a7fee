"""Pods and their owning workloads, through the sync Kubernetes client, as plain JSON dicts.

Objects are read with ``_preload_content=False`` and parsed with ``json``: the client's model
deserialisation costs more CPU than the API call itself at 50 pods/s, and the domain works on
dicts anyway. Every call blocks; callers run it in a worker thread, never on kopf's event loop.

Watches are server-side filtered by namespace and label selector, so the operator only ever
receives the pods of a MeteredProduct, however many other pods the cluster has.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.kube.apiclient import release
from metering_operator.kube.rawapi import JSON_PATCH, RawApi, segment
from metering_operator.kube.watch import WatchExpired as WatchExpired  # re-exported for callers
from metering_operator.kube.watch import WatchStream

JsonPatch = list[dict[str, Any]]

#: Workload kinds whose annotations summarise their pods' entitlement.
WORKLOAD_KINDS = {"Deployment": "apps/v1", "StatefulSet": "apps/v1", "DaemonSet": "apps/v1"}


class PodGone(Exception):
    """The pod was deleted while we were working on it."""


@dataclass(frozen=True)
class WorkloadRef:
    kind: str
    namespace: str
    name: str
    uid: str


def _json(response: Any) -> Any:
    return json.loads(response.data)


def _pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{segment(namespace)}/pods/{segment(name)}"


def is_conflict(exc: ApiException) -> bool:
    # A failed JSON-patch "test" op (our resourceVersion precondition) is answered with 409 or 422
    # depending on the API server version; both mean "re-read and decide again".
    return exc.status in (409, 422)


class PodApi:
    def __init__(self, api: client.ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.raw = RawApi(api)
        self._rs_owner: dict[str, WorkloadRef | None] = {}
        self._lock = threading.Lock()
        #: Pod writes made (patches), for the benchmark's writes-per-pod figure.
        self.pod_writes = 0

    # -- reading ----------------------------------------------------------------------------
    def list(self, namespace: str, selector: str) -> tuple[list[dict[str, Any]], str]:
        """All pods matching ``selector`` in ``namespace`` and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": selector, "limit": 500}
            if token:
                kwargs["_continue"] = token
            data = _json(self.core.list_namespaced_pod(namespace, _preload_content=False, **kwargs))
            items.extend(data.get("items") or [])
            token = data.get("metadata", {}).get("continue")
            if not token:
                return items, str(data.get("metadata", {}).get("resourceVersion", ""))

    def watch(
        self,
        namespace: str,
        selector: str,
        resource_version: str,
        timeout_seconds: int,
        stream: WatchStream | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object) after ``resource_version``, BOOKMARKs included.

        Pass a ``stream`` to be able to end the watch from another thread (``stream.close()``).
        """
        return (stream or WatchStream()).events(
            self.core.list_namespaced_pod,
            timeout_seconds,
            namespace=namespace,
            label_selector=selector,
            resource_version=resource_version,
        )

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            result: dict[str, Any] = json.loads(self.raw.exchange("GET", _pod_path(namespace, name))[0])
        except ApiException as exc:
            if exc.status == 404:
                raise PodGone(f"{namespace}/{name}") from None
            raise
        return result

    def service_account(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = _json(
            self.core.read_namespaced_service_account(name, namespace, _preload_content=False)
        )
        return result

    # -- writing ----------------------------------------------------------------------------
    def json_patch(self, namespace: str, name: str, ops: JsonPatch) -> dict[str, Any]:
        with self._lock:
            self.pod_writes += 1
        try:
            # Raw JSON (kube/rawapi.py): at most two of these per gated pod.
            result: dict[str, Any] = json.loads(
                self.raw.exchange("PATCH", _pod_path(namespace, name), ops, content_type=JSON_PATCH)[0]
            )
        except ApiException as exc:
            if exc.status == 404:
                raise PodGone(f"{namespace}/{name}") from None
            raise
        return result

    def write_with_retry(
        self,
        pod: Mapping[str, Any],
        make_ops: Callable[[Mapping[str, Any]], JsonPatch | None],
        attempts: int = 8,
    ) -> dict[str, Any] | None:
        """Patch with ``make_ops(pod)``; on a precondition conflict re-read and decide again.

        ``make_ops`` returns None when, given the fresh pod, nothing should be written (e.g.
        another writer already recorded a final state). Returns the patched pod or None.
        """
        meta = pod.get("metadata", {})
        namespace, name = meta["namespace"], meta["name"]
        current: Mapping[str, Any] = pod
        for _ in range(attempts):
            ops = make_ops(current)
            if ops is None:
                return None
            try:
                return self.json_patch(namespace, name, ops)
            except ApiException as exc:
                if not is_conflict(exc):
                    raise
            current = self.get(namespace, name)
            if current.get("metadata", {}).get("uid") != meta.get("uid"):
                raise PodGone(f"{namespace}/{name} was replaced")
        raise RuntimeError(f"pod {namespace}/{name}: still conflicting after {attempts} attempts")

    def evict(self, namespace: str, name: str, uid: str) -> None:
        """Evict through the Eviction API (``pods/eviction`` create): PodDisruptionBudgets are
        honoured (429 while one disallows it) and the uid precondition makes sure a pod re-created
        under the same name is never hit. A pod already gone is not an error."""
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": namespace},
            "deleteOptions": {"preconditions": {"uid": uid}},
        }
        try:
            release(self.core.create_namespaced_pod_eviction(name, namespace, body, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                raise PodGone(f"{namespace}/{name}") from None
            raise

    # -- owners -----------------------------------------------------------------------------
    def owner_workload(self, pod: Mapping[str, Any]) -> WorkloadRef | None:
        """The Deployment / StatefulSet / DaemonSet owning the pod (through its ReplicaSet)."""
        meta = pod.get("metadata", {})
        namespace = meta.get("namespace", "")
        for ref in meta.get("ownerReferences") or []:
            if not ref.get("controller"):
                continue
            kind = ref.get("kind")
            if kind in WORKLOAD_KINDS:
                return WorkloadRef(kind, namespace, ref["name"], ref.get("uid", ""))
            if kind == "ReplicaSet":
                return self._replicaset_owner(namespace, ref["name"], ref.get("uid", ""))
        return None

    def _replicaset_owner(self, namespace: str, name: str, uid: str) -> WorkloadRef | None:
        with self._lock:
            if uid in self._rs_owner:
                return self._rs_owner[uid]
        try:
            rs = _json(self.apps.read_namespaced_replica_set(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        owner: WorkloadRef | None = None
        for ref in rs.get("metadata", {}).get("ownerReferences") or []:
            if ref.get("controller") and ref.get("kind") == "Deployment":
                owner = WorkloadRef("Deployment", namespace, ref["name"], ref.get("uid", ""))
        with self._lock:
            # ReplicaSet ownership never changes; bounded by the number of ReplicaSets seen.
            if len(self._rs_owner) > 10_000:
                self._rs_owner.clear()
            self._rs_owner[uid] = owner
        return owner

    def annotate_workload(self, ref: WorkloadRef, annotations: Mapping[str, str]) -> None:
        body = {"metadata": {"annotations": dict(annotations)}}
        patch = {
            "Deployment": self.apps.patch_namespaced_deployment,
            "StatefulSet": self.apps.patch_namespaced_stateful_set,
            "DaemonSet": self.apps.patch_namespaced_daemon_set,
        }[ref.kind]
        try:
            release(
                patch(
                    ref.name,
                    ref.namespace,
                    body,
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                )
            )
        except ApiException as exc:
            if exc.status != 404:
                raise


def object_ref(obj: Mapping[str, Any], kind: str, api_version: str) -> dict[str, str]:
    meta = obj.get("metadata", {})
    return {
        "kind": kind,
        "apiVersion": api_version,
        "name": meta.get("name", ""),
        "namespace": meta.get("namespace", ""),
        "uid": meta.get("uid", ""),
    }
