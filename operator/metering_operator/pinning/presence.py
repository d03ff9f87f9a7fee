"""Is every pinned MeteredProduct there? Checked at start, on its deletion and periodically.

A buyer can delete the pinned MeteredProduct (its pods keep running, ungated by nothing and
metered by nothing). That cannot be prevented from here, so it is made visible: a Warning Event
in the pinned namespace (on the missing object's name), the gauge
``marketplace_metering_pinned_product_missing`` and an operator log line, on each transition from
present to missing; a Normal Event when it is back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator import metrics
from metering_operator.domain.pins import Pin, Pins
from metering_operator.domain.product import API_VERSION, GROUP, KIND, PLURAL, VERSION
from metering_operator.kube.events import EventPoster

log = logging.getLogger(__name__)

#: How often every pin is checked, besides at start and on each deletion.
CHECK_INTERVAL_SECONDS = 30.0


class PinPresence:
    """Tracks, per pin, whether its MeteredProduct exists; reports each transition once."""

    def __init__(self, api: client.ApiClient, events: EventPoster, pins: Pins) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.events = events
        self.pins = pins
        self._missing: dict[str, bool] = {}
        self._lock = threading.Lock()

    def check_all(self) -> None:
        for pin in self.pins.pins:
            self.check(pin)

    def check(self, pin: Pin) -> None:
        """Read the pinned MeteredProduct and report if it is missing or being deleted."""
        try:
            obj: Mapping[str, Any] | None = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, pin.namespace, PLURAL, pin.name
            )
        except ApiException as exc:
            if exc.status != 404:
                log.warning("cannot check pinned MeteredProduct %s: %s %s", pin.key, exc.status, exc.reason)
                return
            obj = None
        if obj is None:
            self.report(pin, missing=True, why="does not exist")
        elif (obj.get("metadata") or {}).get("deletionTimestamp"):
            self.report(pin, missing=True, why="is being deleted")
        else:
            self.report(pin, missing=False)

    def missing(self, pin: Pin) -> bool:
        """Whether the pinned product was last reported missing (its next event reports it back)."""
        with self._lock:
            return bool(self._missing.get(pin.key))

    def report(self, pin: Pin, *, missing: bool, why: str = "") -> None:
        with self._lock:
            before = self._missing.get(pin.key)
            self._missing[pin.key] = missing
        metrics.PINNED_PRODUCT_MISSING.labels(pin.namespace, pin.name, pin.product_code).set(
            1 if missing else 0
        )
        if missing == before or (not missing and before is None):
            return
        ref = {"kind": KIND, "apiVersion": API_VERSION, "name": pin.name, "namespace": pin.namespace}
        if missing:
            message = (
                f"MeteredProduct {pin.key}, pinned by the seller for product code {pin.product_code}, "
                f"{why}: its pods are neither gated nor metered until it is restored"
            )
            log.warning("%s", message)
            self.events.post(ref, "Warning", "PinnedProductMissing", message)
        else:
            message = f"MeteredProduct {pin.key}, pinned for product code {pin.product_code}, exists again"
            log.info("%s", message)
            self.events.post(ref, "Normal", "PinnedProductPresent", message)
