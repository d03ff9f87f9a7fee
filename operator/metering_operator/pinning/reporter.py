"""Per MeteredProduct event: report spec changes, pin violations and the ``Enforced`` condition.

Called for every event of every MeteredProduct (kopf ``on.event``, including the initial listing
at start). Stateless across restarts by design: the last-seen spec is read from
``status.observedSpec`` (the operator's own record, which a buyer cannot write), so a change made
while the operator was down is reported when it starts.

Writes ``status.observedSpec`` and the ``Enforced`` condition with server-side apply under its own
field manager (:data:`FIELD_MANAGER`), only when they differ from what the object says; the gate
(``Ready``, ``Entitled``) and metering (``Metering``, ``status.metering``) keep theirs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator import metrics
from metering_operator.domain import transitions
from metering_operator.domain.clock import Clock
from metering_operator.domain.conditions import condition_changed, get_condition, set_condition
from metering_operator.domain.echoes import Fingerprints, report_fingerprint
from metering_operator.domain.pins import Pins, Resolution, resolve
from metering_operator.domain.product import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    MeteredProduct,
    ObservedSpec,
)
from metering_operator.kube.apiclient import release
from metering_operator.kube.events import EventPoster
from metering_operator.kube.pods import object_ref
from metering_operator.pinning.presence import PinPresence

log = logging.getLogger(__name__)

FIELD_MANAGER = "metering-operator-spec"


class SpecReporter:
    def __init__(
        self, api: client.ApiClient, events: EventPoster, pins: Pins, presence: PinPresence, clock: Clock
    ) -> None:
        self.clock = clock
        self.custom = client.CustomObjectsApi(api)
        self.events = events
        self.pins = pins
        self.presence = presence
        self._lock = threading.Lock()
        #: uid -> the spec fields last seen (ahead of status while our own write is in flight).
        self._seen: dict[str, ObservedSpec] = {}
        #: namespace/name -> violated fields (for the gauge and the Event on change).
        self._violations: dict[str, tuple[str, dict[str, str]]] = {}
        #: uid -> what :meth:`observe` read in the last event after which the status needed no
        #: write: an event that changes none of it (another writer's status echo) is settled.
        self._settled = Fingerprints()

    def settled(self, event_type: str | None, body: Mapping[str, Any]) -> bool:
        """Cheap, no parsing, safe on kopf's loop: True when :meth:`observe` would do nothing for
        this event -- the spec (uid, generation), ``status.observedSpec`` and the ``Enforced``
        condition are as they were when it last found nothing to write. A deletion, a product
        whose pin says it is missing, a spec change and a status someone else changed are never
        settled."""
        if event_type == "DELETED":
            return False
        meta = body.get("metadata") or {}
        pin = self.pins.at(str(meta.get("namespace") or ""), str(meta.get("name")))
        if pin is not None and self.presence.missing(pin):
            return False
        return self._settled.seen(str(meta.get("uid")), report_fingerprint(body))

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        namespace, name, uid = str(meta.get("namespace") or ""), str(meta.get("name")), str(meta.get("uid"))
        pin = self.pins.at(namespace, name)
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self._set_violations(namespace, name, "", {})
            with self._lock:
                self._seen.pop(uid, None)
            self._settled.forget(uid)
            if pin is not None:
                self.presence.report(
                    pin, missing=True, why="was deleted" if event_type == "DELETED" else "is being deleted"
                )
            return
        if pin is not None:
            self.presence.report(pin, missing=False)
        try:
            product = MeteredProduct.from_kube(body)
        except ValidationError:
            return  # the gate reports an invalid spec (Ready=False InvalidSpec)
        spec = product.spec
        resolution = resolve(self.pins, namespace, name, spec)
        declared = transitions.observe(spec)
        with self._lock:
            previous = self._seen.get(uid) or product.status.observed_spec
            self._seen[uid] = declared
        ref = object_ref(body, KIND, API_VERSION)
        violated = {v.field: v.message for v in resolution.violations}
        if resolution.refusal is not None:
            violated["spec.productCode"] = resolution.refusal
        for change in transitions.changes(previous, declared):
            self._report_change(ref, change, resolution, violated)
        ready = resolution.ready()
        self._set_violations(namespace, name, spec.product_code, violated, ref, ready.reason if ready else "")
        if not self._write_status(body, declared, resolution):
            self._settled.remember(uid, report_fingerprint(body))
        else:
            self._settled.forget(uid)  # our write's echo is looked at in full once

    # -- changes ------------------------------------------------------------------------------
    def _report_change(
        self,
        ref: dict[str, str],
        change: transitions.Change,
        resolution: Resolution,
        violated: dict[str, str],
    ) -> None:
        message = change.message
        if change.field in violated and resolution.pin is not None and resolution.obeyed:
            message += "; not obeyed: the seller's pin applies (" + violated[change.field] + ")"
        kind: Literal["Normal", "Warning"] = "Warning" if change.weakens else "Normal"
        metrics.SPEC_CHANGES.labels(
            ref["namespace"], ref["name"], change.field, str(change.weakens).lower()
        ).inc()
        log.log(
            logging.WARNING if change.weakens else logging.INFO,
            "%s/%s: %s",
            ref["namespace"],
            ref["name"],
            message,
        )
        self.events.post(ref, kind, change.reason, message)

    # -- pin violations -----------------------------------------------------------------------
    def _set_violations(
        self,
        namespace: str,
        name: str,
        product_code: str,
        violated: dict[str, str],
        ref: dict[str, str] | None = None,
        reason: str = "",
    ) -> None:
        key = f"{namespace}/{name}"
        with self._lock:
            before_code, before = self._violations.get(key, ("", {}))
            if violated:
                self._violations[key] = (product_code, violated)
            else:
                self._violations.pop(key, None)
        for field in before:
            if field not in violated or before_code != product_code:
                metrics.PIN_VIOLATIONS.remove(namespace, name, before_code, field)
        for field in violated:
            metrics.PIN_VIOLATIONS.labels(namespace, name, product_code, field).set(1)
        if ref is not None and violated and violated != before:
            message = "; ".join(violated.values())
            log.warning("%s: %s: %s", key, reason, message)
            self.events.post(ref, "Warning", reason, message)

    # -- status -------------------------------------------------------------------------------
    def _write_status(self, body: Mapping[str, Any], declared: ObservedSpec, resolution: Resolution) -> bool:
        """Write what differs; True when a write was needed (made or failed)."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        wanted = transitions.enforced_condition(resolution.spec, obeyed=resolution.obeyed)
        conditions = set_condition(
            status.get("conditions"),
            wanted.type,
            wanted.status,
            wanted.reason,
            wanted.message,
            int(meta.get("generation") or 0),
            self.clock.now(),
        )
        condition = get_condition(conditions, wanted.type)
        observed = declared.to_kube()
        current = get_condition(status.get("conditions"), wanted.type)
        if not condition_changed(current, condition) and status.get("observedSpec") == observed:
            return False
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        patch = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": {"observedSpec": observed, "conditions": [condition]},
        }
        try:
            release(
                self.custom.patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    name,
                    patch,
                    field_manager=FIELD_MANAGER,
                    force=True,
                    _content_type="application/apply-patch+yaml",
                    _preload_content=False,
                )
            )
        except ApiException as exc:
            if exc.status != 404:  # gone: nothing left to report on
                log.warning("status of %s/%s not written: %s %s", namespace, name, exc.status, exc.reason)
        return True
