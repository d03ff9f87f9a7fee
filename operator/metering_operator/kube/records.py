"""The operator's own record of denied pods: a ConfigMap per product in the operator's namespace.

A denial must outlive the operator (AWS checks the subscription on a pod's *first* RegisterUsage
only, so asking again could let an unentitled pod through) and no buyer may erase or forge it.
Pod annotations fail the second test: whoever can edit the pod can edit them. The record therefore
lives in the operator's own namespace, which buyers' namespace roles do not reach, in a
ConfigMap only the operator's ServiceAccount writes (chart RBAC: ``configmaps`` get/create/patch
in the release namespace). One ConfigMap per MeteredProduct, named from a hash of
``namespace/name`` (so a re-created product keeps its denials); ``data`` maps pod uid to a JSON
``{"pod", "reason", "at"}``. Entries are added with a JSON merge patch (no read-modify-write
race) and pruned when the product's pod list no longer has the pod, so the object stays bounded by
the product's live pods.

A grant needs no such record: the verified signature for the pod's own uid is its own proof.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from datetime import datetime

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.conditions import format_time
from metering_operator.domain.product import ANNOTATION_PRODUCT, MANAGED_BY_LABEL
from metering_operator.domain.product import MANAGED_BY as OPERATOR_NAME
from metering_operator.kube.apiclient import release

log = logging.getLogger(__name__)

MANAGED_BY = {MANAGED_BY_LABEL: OPERATOR_NAME}
COMPONENT_LABEL = "app.kubernetes.io/component"
DENIALS_COMPONENT = "entitlement-denials"
COMPONENT = {COMPONENT_LABEL: DENIALS_COMPONENT}


def record_name(namespace: str, name: str, prefix: str = "mmo-denials") -> str:
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]
    return f"{prefix}-{digest}"


class OperatorRecords:
    """One ConfigMap per product in the operator's namespace, ``data`` keyed by pod uid (blocking:
    worker threads only). Entries are merged in with JSON merge patches (no read-modify-write)."""

    prefix = "mmo-denials"
    component = COMPONENT

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace

    def name(self, product_namespace: str, product_name: str) -> str:
        return record_name(product_namespace, product_name, self.prefix)

    def read(self, product_namespace: str, product_name: str) -> dict[str, str]:
        """The raw entries; empty when the product has no record yet."""
        try:
            cm = self.core.read_namespaced_config_map(
                self.name(product_namespace, product_name), self.namespace
            )
        except ApiException as exc:
            if exc.status == 404:
                return {}
            raise
        return dict(cm.data or {})

    def prune(self, product_namespace: str, product_name: str, uids: Iterable[str]) -> None:
        gone: dict[str, str | None] = dict.fromkeys(uids)
        if gone:
            self._merge(product_namespace, product_name, gone, create=False)

    def _merge(
        self, product_namespace: str, product_name: str, data: Mapping[str, str | None], create: bool = True
    ) -> None:
        name = self.name(product_namespace, product_name)
        try:
            release(
                self.core.patch_namespaced_config_map(
                    name,
                    self.namespace,
                    {"data": dict(data)},
                    _content_type="application/merge-patch+json",
                    _preload_content=False,
                )
            )
            return
        except ApiException as exc:
            if exc.status != 404 or not create:
                if exc.status == 404:
                    return
                raise
        body = {
            "metadata": {
                "name": name,
                "labels": {**MANAGED_BY, **self.component},
                "annotations": {ANNOTATION_PRODUCT: f"{product_namespace}/{product_name}"},
            },
            "data": {k: v for k, v in data.items() if v is not None},
        }
        try:
            release(self.core.create_namespaced_config_map(self.namespace, body, _preload_content=False))
        except ApiException as exc:
            if exc.status != 409:
                raise
            self._merge(product_namespace, product_name, data, create=False)


class DenialRecords(OperatorRecords):
    """Read, add and prune one product's denial record."""

    def load(self, product_namespace: str, product_name: str) -> dict[str, str]:
        """pod uid -> reason; empty when the product has no record yet."""
        result: dict[str, str] = {}
        for uid, raw in self.read(product_namespace, product_name).items():
            try:
                result[uid] = str(json.loads(raw).get("reason") or "Denied")
            except (ValueError, AttributeError):
                result[uid] = "Denied"
        return result

    def add(
        self, product_namespace: str, product_name: str, uid: str, pod: str, reason: str, at: datetime
    ) -> None:
        entry = json.dumps({"pod": pod, "reason": reason[:1024], "at": format_time(at)})
        self._merge(product_namespace, product_name, {uid: entry})
