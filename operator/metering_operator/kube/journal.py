"""One ConfigMap per metered product in the operator's namespace: the metering journal's storage.

Only the operator's ServiceAccount writes there (the chart grants it get/create/patch on
ConfigMaps in its own namespace only, the rule the denial records use; buyers' namespaced roles do
not reach it), so what is kept here survives a MeteredProduct's status being wiped or the product
being deleted and created again. The content is opaque JSON to this module (see
:mod:`metering_operator.metering.journal`). Named after the product's namespace and name (not its
uid), so a re-created product finds it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import ANNOTATION_PRODUCT, MANAGED_BY, MANAGED_BY_LABEL

DATA_KEY = "journal.json"
LABEL = "marketplace.metering.dev/journal"
COMPONENT = "metering-journal"


def configmap_name(namespace: str, name: str) -> str:
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:24]
    return f"mmo-journal-{digest}"


class JournalStore:
    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.writes = 0

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            cm = self.core.read_namespaced_config_map(configmap_name(namespace, name), self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        text = (cm.data or {}).get(DATA_KEY)
        if not text:
            return None
        loaded: dict[str, Any] = json.loads(text)
        return loaded

    def write(self, namespace: str, name: str, content: dict[str, Any]) -> None:
        """Create, or patch the data key (only the metering leader writes; the newest content wins)."""
        cm_name = configmap_name(namespace, name)
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": cm_name,
                "namespace": self.namespace,
                "labels": {
                    LABEL: "true",
                    MANAGED_BY_LABEL: MANAGED_BY,
                    "app.kubernetes.io/component": COMPONENT,
                },
                "annotations": {ANNOTATION_PRODUCT: f"{namespace}/{name}"},
            },
            "data": {DATA_KEY: json.dumps(content, sort_keys=True, separators=(",", ":"))},
        }
        try:
            self.core.patch_namespaced_config_map(cm_name, self.namespace, body)
        except ApiException as exc:
            if exc.status != 404:
                raise
            self.core.create_namespaced_config_map(self.namespace, body)
        self.writes += 1
