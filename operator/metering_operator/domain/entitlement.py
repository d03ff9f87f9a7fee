"""Entitlement rules over plain pod dicts: what proves a grant, what to write, what to report.

Pure functions over plain pod dicts and the MeteredProduct models, so every rule of the gate is
unit-tested without a cluster. The per-pod state machine that uses them is
:mod:`metering_operator.gate.machine`.

* Nothing a user can write is an input to a decision: :func:`proven_grant` accepts a pod's
  ``signature`` annotation only when it verifies (PS256, product code, key version) with the pod's
  *own* uid as nonce; the ``entitlement`` annotation, ``reason`` and the rest are records the
  operator writes for people, never read back as proof. A copied signature carries another pod's
  nonce and fails.
* Which AWS errors deny (final), are retried or are errors is
  :mod:`metering_operator.aws.errors`' classification, not repeated here.
* :func:`grant_patch` & co. -- the single JSON patch per transition, guarded by a
  ``resourceVersion`` test so a concurrent change is never overwritten.
* :func:`count_pods`, :func:`workload_summary`, :func:`entitled_condition` -- status views.
"""

from __future__ import annotations

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
    PodCounts,
)
from metering_operator.domain.signature import ProductKey, SignatureError, VerifiedSignature

#: Why a pod is Denied / Pending / Error (``<Code>: <message>``); absent when Granted.
ANNOTATION_REASON = f"{GROUP}/reason"


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


# --- proof ----------------------------------------------------------------------------------------


def annotated_signature(pod: Mapping[str, Any]) -> str | None:
    """The ``signature`` annotation as written (by the operator -- or by anyone: check it)."""
    token = pod_annotations(pod).get(ANNOTATION_SIGNATURE)
    return token.strip() if token else None


def proven_grant(
    pod: Mapping[str, Any], key: ProductKey, nonce: str | None = None
) -> VerifiedSignature | None:
    """The pod's grant if its ``signature`` annotation verifies for ``key`` and ``nonce`` (the pod's
    own uid unless given), else None. The ``entitlement: Granted`` annotation is not consulted:
    only the signature proves anything, and only for the uid it was issued for."""
    token = annotated_signature(pod)
    expected = nonce if nonce is not None else pod.get("metadata", {}).get("uid")
    if not token or not expected:
        return None
    try:
        return key.verify(token, expected)
    except SignatureError:
        return None


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
    return PodCounts(registered=registered, pending=pending, denied=denied)


def workload_summary(states: Sequence[EntitlementState | None]) -> str:
    """The workload's ``entitlement`` annotation: ``Granted 3/3``, ``Denied 1/3``, ``Pending 2/3``."""
    counts = count_pods(states)
    total = len(states)
    if counts.denied:
        return f"Denied {counts.denied}/{total}"
    if counts.registered == total:
        return f"Granted {total}/{total}"
    return f"Pending {counts.registered}/{total}"


@dataclass(frozen=True)
class MemberView:
    """One pod of a workload as the operator knows it: its state and, when granted, the proof."""

    state: EntitlementState | None
    signature: str | None = None
    registered_at: datetime | None = None


def workload_annotations(members: Sequence[MemberView]) -> dict[str, str]:
    """A workload's annotations from its pods' states: the summary, and the latest verified
    signature with its time (never a signature merely found in a pod's annotations)."""
    annotations = {ANNOTATION_ENTITLEMENT: workload_summary([m.state for m in members])}
    signed = [m for m in members if m.signature and m.registered_at is not None]
    latest = max(signed, key=lambda m: m.registered_at or datetime.min, default=None)
    if latest is not None and latest.signature and latest.registered_at is not None:
        annotations[ANNOTATION_SIGNATURE] = latest.signature
        annotations[ANNOTATION_REGISTERED_AT] = format_time(latest.registered_at)
    return annotations


def entitled_condition(
    mode: EntitlementMode,
    counts: PodCounts,
    *,
    last_denial: str | None = None,
    last_error: str | None = None,
    ungated: int = 0,
    source: str = "RegisterUsage",
) -> ConditionSpec:
    """Entitled: the pods' registration state, with the reason that explains it (``source``:
    who answers, RegisterUsage or License Manager)."""
    if mode is EntitlementMode.OFF:
        return ConditionSpec("Entitled", "Unknown", "EntitlementOff", "entitlement.mode is Off")
    if counts.denied:
        code = (last_denial or "Denied").split(":", 1)[0].removesuffix("Exception") or "Denied"
        return ConditionSpec(
            "Entitled",
            "False",
            code,
            f"{counts.denied} pod(s) denied by {source}: {last_denial or 'denied'}",
        )
    suffix = (
        f"; {ungated} pod(s) started without the entitlement gate (admitted while the gate was not "
        "enforced, or the gate was removed)"
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
    template by the seller) is not gated twice. Annotations are never a reason to skip the gate:
    anyone who can create the pod can write them.
    """
    if is_gated(pod):
        return None
    for candidate in sorted(candidates, key=lambda c: c.key):
        if candidate.selects and candidate.trusted and candidate.mode is EntitlementMode.ENFORCE:
            return candidate.key
    return None


# --- pods that run without a grant -------------------------------------------------------------


class UngatedPodAction(StrEnum):
    """What Enforce does with a pod that runs without the gate and is denied (or fails for good)."""

    EVICT = "Evict"  # through the Eviction API (PodDisruptionBudgets are honoured)
    REPORT = "Report"  # Events on the pod and the product only
