"""Entitlement decisions: what to do with a pod, what a result means, and what to write.

Pure functions over plain pod dicts and the MeteredProduct models, so every rule of the gate is
unit-tested without a cluster:

* :func:`decide` -- given a pod and the product's mode: register it, release it, or leave it.
  Granted and Denied are final: a restarted operator never registers such a pod again, and a
  denied pod is never released in Enforce mode (AWS refuses only a pod's *first* call, so a
  retry would let an unentitled pod through).
* Which AWS errors deny (final), are retried or are errors is
  :mod:`metering_operator.aws.errors`' classification, not repeated here.
* :func:`grant_patch` & co. -- the single JSON patch per transition, guarded by a
  ``resourceVersion`` test so a concurrent change is never overwritten.
* :func:`count_pods`, :func:`workload_summary`, :func:`entitled_condition` -- status views.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from metering_operator.domain.conditions import ConditionSpec, format_time
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_PRODUCT,
    ANNOTATION_REGISTERED_AT,
    ANNOTATION_SIGNATURE,
    GROUP,
    SCHEDULING_GATE,
    EntitlementMode,
    EntitlementState,
)

#: Why a pod is Denied / Pending / Error (``<Code>: <message>``); absent when Granted.
ANNOTATION_REASON = f"{GROUP}/reason"


class Action(StrEnum):
    REGISTER = "register"
    RELEASE = "release"
    SKIP = "skip"


class Outcome(StrEnum):
    GRANTED = "Granted"
    DENIED = "Denied"
    ERROR = "Error"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    #: Enforce mode, but the pod carries no gate (webhook unreachable at creation): it runs
    #: already, so it is registered and reported, never silently ignored.
    ungated: bool = False


# --- reading a pod ---------------------------------------------------------------------------------


def pod_annotations(pod: Mapping[str, Any]) -> Mapping[str, str]:
    return pod.get("metadata", {}).get("annotations") or {}


def entitlement_state(pod: Mapping[str, Any]) -> EntitlementState | None:
    value = pod_annotations(pod).get(ANNOTATION_ENTITLEMENT)
    try:
        return EntitlementState(value) if value is not None else None
    except ValueError:
        return None


def gates(pod: Mapping[str, Any]) -> list[str]:
    return [g.get("name", "") for g in pod.get("spec", {}).get("schedulingGates") or []]


def is_gated(pod: Mapping[str, Any]) -> bool:
    return SCHEDULING_GATE in gates(pod)


def is_terminating(pod: Mapping[str, Any]) -> bool:
    if pod.get("metadata", {}).get("deletionTimestamp"):
        return True
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


# --- the decision ----------------------------------------------------------------------------------


def decide(pod: Mapping[str, Any], mode: EntitlementMode) -> Decision:
    """What to do with a pod selected by a product in ``mode``."""
    if mode is EntitlementMode.OFF:
        return Decision(Action.SKIP, "entitlement mode is Off")
    if is_terminating(pod):
        return Decision(Action.SKIP, "pod is terminating")
    state = entitlement_state(pod)
    gated = is_gated(pod)
    if state is EntitlementState.GRANTED:
        # Granted and gated only if something re-added a gate we own; releasing is safe.
        return Decision(Action.RELEASE, "already granted") if gated else Decision(Action.SKIP, "granted")
    if state is EntitlementState.DENIED:
        if mode is EntitlementMode.AUDIT and gated:
            return Decision(Action.RELEASE, "audit mode never holds a pod")
        return Decision(Action.SKIP, "denied (final)")
    if mode is EntitlementMode.ENFORCE and not gated:
        return Decision(Action.REGISTER, "running without the gate", ungated=True)
    return Decision(Action.REGISTER, "not registered yet")


def backoff_delay(
    attempt: int, *, base: float = 0.2, cap: float = 30.0, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter (attempt 1 -> up to ``base``, doubling, capped)."""
    if attempt < 1:
        raise ValueError("attempt starts at 1")
    ceiling = min(cap, base * (2 ** min(attempt - 1, 30)))
    return (rng or random).uniform(ceiling / 2, ceiling)


# --- patches ---------------------------------------------------------------------------------------


def _escape(key: str) -> str:
    """JSON pointer escaping (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _annotation_ops(pod: Mapping[str, Any], values: Mapping[str, str | None]) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    current = pod.get("metadata", {}).get("annotations")
    if current is None:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
        current = {}
    for key, value in values.items():
        path = f"/metadata/annotations/{_escape(key)}"
        if value is None:
            if key in current:
                ops.append({"op": "remove", "path": path})
        else:
            # "add" replaces an existing member of an object (RFC 6902 4.1).
            ops.append({"op": "add", "path": path, "value": value})
    return ops


def _precondition(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    rv = pod.get("metadata", {}).get("resourceVersion")
    if not rv:
        raise ValueError("pod has no resourceVersion: cannot write it safely")
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": rv}]


def _remove_gate_ops(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    names = gates(pod)
    if SCHEDULING_GATE not in names:
        return []
    index = names.index(SCHEDULING_GATE)
    path = f"/spec/schedulingGates/{index}"
    # Test the element first: removal by index must not hit someone else's gate.
    return [
        {"op": "test", "path": f"{path}/name", "value": SCHEDULING_GATE},
        {"op": "remove", "path": path},
    ]


def grant_patch(
    pod: Mapping[str, Any], *, signature: str, registered_at: datetime, product_key: str
) -> list[dict[str, Any]]:
    """Remove the gate and record the proof, in one write."""
    return (
        _precondition(pod)
        + _remove_gate_ops(pod)
        + _annotation_ops(
            pod,
            {
                ANNOTATION_ENTITLEMENT: EntitlementState.GRANTED.value,
                ANNOTATION_SIGNATURE: signature,
                ANNOTATION_REGISTERED_AT: format_time(registered_at),
                ANNOTATION_PRODUCT: product_key,
                ANNOTATION_REASON: None,
            },
        )
    )


def state_patch(
    pod: Mapping[str, Any],
    state: EntitlementState,
    reason: str,
    *,
    product_key: str,
    release: bool = False,
) -> list[dict[str, Any]]:
    """Record Denied / Pending / Error with its reason; ``release`` (Audit mode) removes the gate."""
    if state is EntitlementState.GRANTED:
        raise ValueError("use grant_patch for Granted")
    ops = _precondition(pod)
    if release:
        ops += _remove_gate_ops(pod)
    return ops + _annotation_ops(
        pod,
        {
            ANNOTATION_ENTITLEMENT: state.value,
            ANNOTATION_REASON: reason[:1024],
            ANNOTATION_PRODUCT: product_key,
        },
    )


def release_patch(pod: Mapping[str, Any]) -> list[dict[str, Any]]:
    return _precondition(pod) + _remove_gate_ops(pod)


def needs_state_write(pod: Mapping[str, Any], state: EntitlementState, reason: str) -> bool:
    """Skip writing Pending/Error again when it says the same thing (bounded writes per pod)."""
    return entitlement_state(pod) is not state or pod_annotations(pod).get(ANNOTATION_REASON) != reason[:1024]


# --- summaries -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodCounts:
    registered: int = 0
    pending: int = 0
    denied: int = 0

    def to_status(self) -> dict[str, int]:
        return {"registered": self.registered, "pending": self.pending, "denied": self.denied}


def count_pods(states: Iterable[EntitlementState | None]) -> PodCounts:
    """Granted -> registered, Denied -> denied, anything else (waiting, Pending, Error) -> pending."""
    registered = pending = denied = 0
    for state in states:
        if state is EntitlementState.GRANTED:
            registered += 1
        elif state is EntitlementState.DENIED:
            denied += 1
        else:
            pending += 1
    return PodCounts(registered, pending, denied)


def workload_summary(states: Sequence[EntitlementState | None]) -> str:
    """The workload's ``entitlement`` annotation: ``Granted 3/3``, ``Denied 1/3``, ``Pending 2/3``."""
    counts = count_pods(states)
    total = len(states)
    if counts.denied:
        return f"Denied {counts.denied}/{total}"
    if counts.registered == total:
        return f"Granted {total}/{total}"
    return f"Pending {counts.registered}/{total}"


def workload_annotations(
    members: Sequence[tuple[Mapping[str, Any], EntitlementState | None]],
) -> dict[str, str]:
    """A workload's annotations from its pods and their states: the summary, and the latest
    signature with its time (``registered-at`` is RFC 3339 UTC, so it sorts as text)."""
    annotations = {ANNOTATION_ENTITLEMENT: workload_summary([state for _, state in members])}
    latest_sig, latest_at = None, ""
    for pod, _ in members:
        notes = pod_annotations(pod)
        at = notes.get(ANNOTATION_REGISTERED_AT, "")
        if notes.get(ANNOTATION_SIGNATURE) and at >= latest_at:
            latest_sig, latest_at = notes[ANNOTATION_SIGNATURE], at
    if latest_sig:
        annotations[ANNOTATION_SIGNATURE] = latest_sig
        annotations[ANNOTATION_REGISTERED_AT] = latest_at
    return annotations


def entitled_condition(
    mode: EntitlementMode,
    counts: PodCounts,
    *,
    last_denial: str | None = None,
    last_error: str | None = None,
    ungated: int = 0,
) -> ConditionSpec:
    """Entitled: the pods' registration state, with the reason that explains it."""
    if mode is EntitlementMode.OFF:
        return ConditionSpec("Entitled", "Unknown", "EntitlementOff", "entitlement.mode is Off")
    if counts.denied:
        code = (last_denial or "Denied").split(":", 1)[0].removesuffix("Exception") or "Denied"
        return ConditionSpec(
            "Entitled",
            "False",
            code,
            f"{counts.denied} pod(s) denied by RegisterUsage: {last_denial or 'denied'}",
        )
    suffix = (
        f"; {ungated} pod(s) started without the entitlement gate (webhook unreachable at creation)"
        if ungated
        else ""
    )
    if counts.pending:
        reason = "RegistrationFailing" if last_error else "RegistrationPending"
        detail = f": {last_error}" if last_error else ""
        return ConditionSpec(
            "Entitled",
            "Unknown",
            reason,
            f"{counts.registered} registered, {counts.pending} waiting{detail}{suffix}",
        )
    if counts.registered:
        return ConditionSpec(
            "Entitled", "True", "Registered", f"{counts.registered} pod(s) registered{suffix}"
        )
    return ConditionSpec("Entitled", "Unknown", "NoPods", "no pods match the selector")


# --- the admission webhook's choice ----------------------------------------------------------------


@dataclass(frozen=True)
class GateCandidate:
    """What the webhook knows about one MeteredProduct of the pod's namespace."""

    key: str
    mode: EntitlementMode
    trusted: bool
    selects: bool  # the product's selector matches the pod's labels


def gating_product(pod: Mapping[str, Any], candidates: Iterable[GateCandidate]) -> str | None:
    """The product (``namespace/name``) whose gate a new pod must carry, or None.

    Only trusted Enforce-mode products gate; a pod already carrying the gate (written into its
    template by the seller) is left alone, as is one already annotated by an earlier admission.
    """
    if is_gated(pod) or entitlement_state(pod) is not None:
        return None
    for candidate in sorted(candidates, key=lambda c: c.key):
        if candidate.selects and candidate.trusted and candidate.mode is EntitlementMode.ENFORCE:
            return candidate.key
    return None
