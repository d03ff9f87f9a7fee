"""The metering journal: the live ledger entries kept where only the operator writes.

A MeteredProduct's status can be wiped by anyone allowed to write it, and deleting and
re-creating the product drops it. What the send protocol still needs -- Pending and Unknown
entries, carries not yet taken over, and the open hour as it was when it opened -- is copied to
a ConfigMap in the operator's namespace (:mod:`metering_operator.kube.journal`) whenever that
set changes, and put back by :func:`metering_operator.domain.ledger.restore` when status lost
it. Restored entries come back Unknown: resent identically, never carried, so a stale copy can
neither lose a record nor bill one twice.

Writes are rare on purpose: only when the set of live entries (by hour, dimension and whether
it is carried) or the open hour changes, i.e. about twice per product-hour; claims and retries
do not write here.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from typing import Any

from kubernetes.client.rest import ApiException

from metering_operator.domain import ledger
from metering_operator.domain.product import LedgerState, MeteringStatus
from metering_operator.kube.journal import JournalStore

log = logging.getLogger(__name__)

Key = tuple[datetime | None, tuple[tuple[datetime, str, bool], ...]]


def _key(status: MeteringStatus) -> Key:
    return (
        status.open_hour.start if status.open_hour else None,
        tuple(
            sorted((e.hour, e.dimension, e.state is LedgerState.EXPIRED) for e in ledger.live_entries(status))
        ),
    )


class Journal:
    def __init__(self, store: JournalStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._saved: dict[str, tuple[Key, MeteringStatus]] = {}

    def load(self, namespace: str, name: str, product_code: str) -> MeteringStatus | None:
        """The saved copy for this product (cached after the first read), if it is for this code."""
        product = f"{namespace}/{name}"
        with self._lock:
            cached = self._saved.get(product)
        if cached is not None:
            return cached[1]
        try:
            content = self.store.read(namespace, name)
        except ApiException as exc:
            log.warning("%s: cannot read the metering journal: %s", product, exc.reason)
            return None
        saved = self._parse(product, content, product_code)
        if saved is not None:
            with self._lock:
                self._saved[product] = (_key(saved), saved)
        return saved

    @staticmethod
    def _parse(product: str, content: dict[str, Any] | None, product_code: str) -> MeteringStatus | None:
        if not content:
            return None
        if content.get("productCode") != product_code:
            log.warning(
                "%s: the metering journal is for product code %s, not %s: not used",
                product,
                content.get("productCode"),
                product_code,
            )
            return None
        try:
            return MeteringStatus.model_validate(content.get("metering") or {})
        except ValueError as exc:
            log.warning("%s: unreadable metering journal: %s", product, exc)
            return None

    def save(self, namespace: str, name: str, product_code: str, status: MeteringStatus) -> bool:
        """Keep ``status``'s live part if it changed since the last save; returns whether it wrote."""
        product = f"{namespace}/{name}"
        key = _key(status)
        with self._lock:
            cached = self._saved.get(product)
        if cached is not None and cached[0] == key:
            return False
        copy = MeteringStatus(open_hour=status.open_hour, ledger=ledger.live_entries(status))
        content = {"product": product, "productCode": product_code, "metering": copy.to_kube()}
        try:
            self.store.write(namespace, name, content)
        except ApiException as exc:
            log.warning("%s: cannot write the metering journal: %s", product, exc.reason)
            return False
        with self._lock:
            self._saved[product] = (key, copy)
        return True

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._saved.pop(f"{namespace}/{name}", None)
