"""Read a MeteredProduct and write its status with a resourceVersion precondition.

The metering ledger is only safe if a status write based on a stale read can never win: two
operator processes (a replaced pod and its successor, or two replicas during a lease hand-over)
must not both record an hour as theirs. So every write is a ``replace`` of the status
subresource carrying the ``metadata.resourceVersion`` that was read; the API server refuses it
with 409 Conflict if anything changed the object in between, and the caller re-reads and
re-applies its (pure) transition. Fields the caller does not touch (the entitlement half of the
status) travel through unchanged, and with the precondition they cannot be stale either.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import GROUP, PLURAL, VERSION


class Conflict(RuntimeError):
    """The object changed since it was read (HTTP 409): re-read and re-apply."""


class Gone(RuntimeError):
    """The object no longer exists."""


class StatusStore:
    def __init__(self, api: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.writes = 0
        self.conflicts = 0

    def read(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise Gone(f"{namespace}/{name} no longer exists") from None
            raise
        return obj

    def list_products(self, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        """MeteredProducts in ``namespaces`` (all namespaces when empty)."""
        if not namespaces:
            result = self.custom.list_cluster_custom_object(GROUP, VERSION, PLURAL)
            return list(result.get("items") or [])
        items: list[dict[str, Any]] = []
        for namespace in namespaces:
            items.extend(
                self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL).get("items")
                or []
            )
        return items

    def write_status(self, obj: Mapping[str, Any], status: Mapping[str, Any]) -> dict[str, Any]:
        """Replace ``obj``'s status, only if ``obj``'s resourceVersion is still current."""
        meta = obj["metadata"]
        version = meta.get("resourceVersion")
        if not version:
            raise ValueError("a status write needs the resourceVersion that was read")
        body = {
            "apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"),
            "kind": obj.get("kind", "MeteredProduct"),
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": version},
            "spec": copy.deepcopy(obj.get("spec") or {}),
            "status": dict(status),
        }
        try:
            result: dict[str, Any] = self.custom.replace_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body
            )
        except ApiException as exc:
            if exc.status == 409:
                self.conflicts += 1
                raise Conflict(
                    f"{meta['namespace']}/{meta['name']} changed since resourceVersion {version}"
                ) from None
            if exc.status == 404:
                raise Gone(f"{meta['namespace']}/{meta['name']} no longer exists") from None
            raise
        self.writes += 1
        return result

    def update(
        self,
        namespace: str,
        name: str,
        transition: Callable[[dict[str, Any]], dict[str, Any] | None],
        attempts: int = 5,
    ) -> dict[str, Any] | None:
        """Read, apply ``transition(obj) -> new status | None`` and write; retried on conflict.

        Returns the written object, or None when the transition wanted no write.
        """
        for _ in range(attempts):
            obj = self.read(namespace, name)
            status = transition(obj)
            if status is None:
                return None
            try:
                return self.write_status(obj, status)
            except Conflict:
                continue
        raise Conflict(f"{namespace}/{name}: still conflicting after {attempts} attempts")
