"""The gate's half of a MeteredProduct's status: what to write, and the write itself.

The product controller owns the inputs (its pods, their states, the product as parsed); this
module turns them into the ``Ready`` / ``Entitled`` conditions, ``pods`` counts,
``observedGeneration`` and scope Cluster's ``registration``, and applies them with server-side
apply under :data:`FIELD_MANAGER` -- only when they differ from what the object says, and never
twice in a row for the same body while the cached object catches up with our own write.

``Ready`` has exactly one writer, this one (:mod:`metering_operator.domain.readiness`); the
metering handlers own ``Metering`` and ``status.metering``, which server-side apply leaves alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain import entitlement as ent
from metering_operator.domain.conditions import (
    ConditionSpec,
    condition_changed,
    get_condition,
    set_condition,
    status_patch,
)
from metering_operator.domain.product import API_VERSION, GROUP, KIND, PLURAL, VERSION, PodCounts
from metering_operator.domain.readiness import ready_condition
from metering_operator.gate.product import ProductInfo
from metering_operator.gate.runtime import GateRuntime
from metering_operator.kube.apiclient import release
from metering_operator.kube.pods import object_ref

log = logging.getLogger(__name__)

FIELD_MANAGER = "metering-operator-entitlement"
#: How long our own last write is trusted over a cached object that does not show it yet.
SELF_WRITE_GRACE_SECONDS = 10.0
MINE = ("Ready", "Entitled")

EventSpec = tuple[Literal["Normal", "Warning"], str, str]


@dataclass(frozen=True)
class GateView:
    """What the controller knows that the status reports."""

    counts: PodCounts
    ungated: int = 0
    last_denial: str | None = None
    last_error: str | None = None
    registration: dict[str, Any] | None = None
    #: Contract products: pods waiting for a License Manager seat to free up.
    exhausted: int = 0


def gate_conditions(
    info: ProductInfo | None, view: GateView, existing: Sequence[Mapping[str, Any]]
) -> tuple[ConditionSpec, ConditionSpec]:
    """``Ready`` and ``Entitled`` for the product (``info`` None: the spec does not parse)."""
    if info is None:
        return (
            ready_condition(spec_error="the spec does not parse; see the operator log"),
            ConditionSpec("Entitled", "Unknown", "InvalidSpec", "the spec does not parse"),
        )
    ready = ready_condition(
        trusted=info.trusted,
        pinned=info.resolution.ready() if info.resolution is not None else None,
        product_code=info.spec.product_code,
        key_error=info.key_error,
        meters=bool(info.spec.metering.dimensions),
        metering=get_condition(existing, "Metering"),
        denied_pods=view.counts.denied,
        other_pods=view.counts.registered + view.counts.pending,
    )
    if not info.trusted:
        return ready, ConditionSpec("Entitled", "False", "UntrustedProductCode", ready.message)
    if not info.obeyed:
        return ready, ConditionSpec("Entitled", "False", ready.reason, ready.message)
    entitled = ent.entitled_condition(
        info.mode,
        view.counts,
        last_denial=view.last_denial,
        last_error=view.last_error if view.counts.pending else None,
        ungated=view.ungated,
        source="License Manager" if info.license is not None else "RegisterUsage",
    )
    if info.license is not None and view.exhausted and not view.counts.denied:
        entitled = ConditionSpec(
            "Entitled",
            "False",
            "SeatsExhausted",
            f"{view.counts.registered} pod(s) hold a License Manager seat, {view.exhausted} wait for one "
            "to free up (the license's seats are all in use)",
        )
    return ready, entitled


@dataclass(frozen=True)
class StatusWrite:
    """One server-side apply of the gate's status, and the Events its transitions deserve."""

    body: dict[str, Any]
    events: list[EventSpec]
    ref: dict[str, str]


class StatusWriter:
    """Decides whether a status write is due, and makes it (the latter in a worker thread)."""

    def __init__(self, runtime: GateRuntime, namespace: str, name: str) -> None:
        self.rt = runtime
        self.namespace = namespace
        self.name = name
        self.inflight = False
        self._last_applied: dict[str, Any] | None = None
        self._last_applied_at = 0.0
        self._last_conditions: dict[str, Mapping[str, Any]] = {}

    def plan(
        self, obj: Mapping[str, Any], info: ProductInfo | None, view: GateView, now: datetime
    ) -> StatusWrite | None:
        """The write ``obj`` needs, or None when it already says all this (or we just wrote it)."""
        current = obj.get("status") or {}
        generation = int(obj.get("metadata", {}).get("generation") or 0)
        existing = current.get("conditions") or []
        specs = gate_conditions(info, view, existing)
        conditions = existing
        for spec in specs:
            conditions = set_condition(
                conditions, spec.type, spec.status, spec.reason, spec.message, generation, now
            )
        mine = [c for c in conditions if c["type"] in MINE]
        status: dict[str, Any] = {"observedGeneration": generation, "pods": view.counts.to_kube()}
        if view.registration is not None:
            status["registration"] = view.registration
        if status_patch(current, {**status, "conditions": conditions}) is None:
            return None
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": {**status, "conditions": mine},
        }
        if body == self._last_applied and time.monotonic() - self._last_applied_at < SELF_WRITE_GRACE_SECONDS:
            return None  # our previous write says exactly this; the cached object has not caught up
        # Events for condition transitions, judged against what we last wrote (the cached object
        # may lag behind our own writes).
        events: list[EventSpec] = []
        for spec in specs:
            before = self._last_conditions.get(spec.type) or get_condition(existing, spec.type)
            if condition_changed(before, get_condition(conditions, spec.type)):
                kind: Literal["Normal", "Warning"] = "Warning" if spec.status == "False" else "Normal"
                events.append((kind, f"{spec.type}{spec.reason}"[:128], spec.message))
        self._last_applied = body
        self._last_applied_at = time.monotonic()
        self._last_conditions = {c["type"]: c for c in mine}
        return StatusWrite(body, events, object_ref(obj, KIND, API_VERSION))

    def forget(self) -> None:
        """The last write failed: judge the next one against the object alone."""
        self._last_applied = None
        self._last_conditions = {}

    def apply(self, write: StatusWrite) -> bool:
        """Server-side apply (blocking: a worker thread); True when done or nothing is left to do."""
        try:
            release(
                client.CustomObjectsApi(self.rt.api).patch_namespaced_custom_object_status(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    self.name,
                    write.body,
                    field_manager=FIELD_MANAGER,
                    force=True,
                    _content_type="application/apply-patch+yaml",
                    _preload_content=False,
                )
            )
        except ApiException as exc:
            log.warning(
                "status of %s/%s not written: %s %s", self.namespace, self.name, exc.status, exc.reason
            )
            return bool(exc.status == 404)  # the product is gone: nothing to retry
        except Exception:
            log.exception("status of %s/%s not written", self.namespace, self.name)
            return False
        for kind, reason, message in write.events:
            self.rt.events.post(write.ref, kind, reason, message)
        return True
