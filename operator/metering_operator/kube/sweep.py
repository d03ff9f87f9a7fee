"""Removes the operator's own records of MeteredProducts that are gone, once they cannot matter.

The denial records (:mod:`metering_operator.kube.records`) and the metering journal
(:mod:`metering_operator.kube.journal`) are ConfigMaps in the operator's namespace, named after the
product's namespace and name so that a product deleted and created again finds them. That is why
deleting a product does not delete them. Kept forever, one pair per product ever made would pile
up, so a periodic sweep removes a record whose product no longer exists and which no re-created
product could use any more:

* a denial record once none of the pods it names exists (same name *and* uid): a denial matters
  only to a pod that could ask again, and a new pod is checked afresh anyway;
* a journal once :func:`metering_operator.domain.ledger.restorable` says nothing in it could be
  restored (every live entry is past the restore horizon, far outside AWS's six-hour window);
* a License Manager seat record once every lease in it has expired (AWS has returned the seats).

While the product exists nothing is removed, nor when its existence cannot be told (403 in a
namespace the operator no longer watches, API errors): keeping a record is always safe. Each
delete carries the ConfigMap's uid and resourceVersion as preconditions, so a record written
again between the read and the delete (the product came back) is kept. Only ConfigMaps with the
operator's ``managed-by`` label are listed, and the `-operator` admission policy refuses the
operator's deletes of any other ConfigMap.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator.domain import ledger
from metering_operator.domain.clock import Clock
from metering_operator.domain.product import (
    ANNOTATION_PRODUCT,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PLURAL,
    VERSION,
    MeteringStatus,
)
from metering_operator.kube import journal, records, seat_records
from metering_operator.kube.apiclient import release

log = logging.getLogger(__name__)

#: How many ConfigMaps one list page holds (the operator's namespace holds two per product).
PAGE_SIZE = 250


class RecordSweeper:
    """One sweep at a time over the operator's record ConfigMaps (blocking: run it in a thread)."""

    def __init__(self, api: client.ApiClient, namespace: str, clock: Clock) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.clock = clock

    def sweep(self) -> list[tuple[str, str]]:
        """Delete the records that can no longer matter; returns (name, kind) of each deleted."""
        deleted: list[tuple[str, str]] = []
        token: str | None = None
        while True:
            page = self.core.list_namespaced_config_map(
                self.namespace,
                label_selector=f"{MANAGED_BY_LABEL}={MANAGED_BY}",
                limit=PAGE_SIZE,
                **({"_continue": token} if token else {}),
            )
            for cm in page.items:
                kind = self._obsolete(cm)
                if kind is not None and self._delete(cm):
                    log.info(
                        "removed %s %s of the deleted product %s",
                        kind,
                        cm.metadata.name,
                        "/".join(_product(cm) or ()),
                    )
                    deleted.append((cm.metadata.name, kind))
            token = page.metadata._continue
            if not token:
                return deleted

    def _obsolete(self, cm: Any) -> str | None:
        """The record's kind if it may be deleted now, else None."""
        labels = cm.metadata.labels or {}
        product = _product(cm)
        if product is None or self._product_may_exist(*product):
            return None
        if labels.get(records.COMPONENT_LABEL) == records.DENIALS_COMPONENT:
            return None if self._any_pod_alive(product[0], cm.data or {}) else "denials"
        if labels.get(journal.LABEL) == "true":
            return None if self._journal_restorable(cm) else "journal"
        if labels.get(records.COMPONENT_LABEL) == seat_records.SEATS_COMPONENT_NAME:
            return "seats" if not seat_records.any_lease_live(dict(cm.data or {}), self.clock.now()) else None
        return None  # a record kind this version does not know: keep it

    def _product_may_exist(self, namespace: str, name: str) -> bool:
        try:
            self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            return bool(exc.status != 404)
        return True

    def _any_pod_alive(self, namespace: str, data: dict[str, str]) -> bool:
        for uid, raw in data.items():
            try:
                name = str(json.loads(raw)["pod"])
            except (ValueError, KeyError, TypeError):
                return True  # an entry this version cannot read: keep the record
            try:
                pod = self.core.read_namespaced_pod(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    continue
                return True
            if str(pod.metadata.uid) == uid:
                return True
        return False

    def _journal_restorable(self, cm: Any) -> bool:
        text = (cm.data or {}).get(journal.DATA_KEY)
        if not text:
            return False
        try:
            saved = MeteringStatus.model_validate(json.loads(text).get("metering") or {})
        except (ValueError, ValidationError, AttributeError):
            return True  # unreadable by this version: keep it
        return ledger.restorable(saved, self.clock.now())

    def _delete(self, cm: Any) -> bool:
        preconditions = client.V1Preconditions(
            uid=cm.metadata.uid, resource_version=cm.metadata.resource_version
        )
        try:
            release(
                self.core.delete_namespaced_config_map(
                    cm.metadata.name,
                    self.namespace,
                    body=client.V1DeleteOptions(preconditions=preconditions),
                    _preload_content=False,
                )
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False  # gone already, or written again since it was read: keep it
            raise
        return True


def _product(cm: Any) -> tuple[str, str] | None:
    namespace, _, name = ((cm.metadata.annotations or {}).get(ANNOTATION_PRODUCT) or "").partition("/")
    return (namespace, name) if namespace and name else None
