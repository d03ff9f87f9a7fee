"""metav1.Condition helpers and "write status only when it changed".

Conditions are handled as plain JSON dicts (the shape the API server stores and kopf hands to
handlers) so the same helpers serve the entitlement and the metering handlers; a fresh one is
built by the pydantic :class:`~metering_operator.domain.product.Condition` that also generates
the CRD's schema, so there is one definition of the shape. Two rules from the Kubernetes API
conventions are enforced here:

* ``lastTransitionTime`` moves only when ``status`` changes; a new reason or message with the
  same status keeps the old timestamp (otherwise every resync would look like a transition).
* Status is written only when something other than bookkeeping changed: :func:`status_patch`
  returns the minimal merge patch, or ``None`` when nothing needs writing.

Public API (kept stable; the metering handlers use it too):
``make_condition``, ``set_condition``, ``get_condition``, ``is_true``, ``condition_changed``,
``status_patch``, ``format_time``, ``parse_time``, ``ConditionSpec``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from metering_operator.domain.clock import ensure_utc
from metering_operator.domain.product import Condition

ConditionStatus = Literal["True", "False", "Unknown"]
_VALID_STATUS = ("True", "False", "Unknown")
# metav1.Condition: reason is CamelCase, 1..1024 chars; message at most 32768 chars.
_MAX_MESSAGE = 32768


@dataclass(frozen=True)
class ConditionSpec:
    """A condition's verdict before it is stamped with a generation and a time."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


def format_time(when: datetime) -> str:
    """RFC 3339 UTC with seconds precision, as metav1.Time serialises (``2026-01-02T03:04:05Z``)."""
    return ensure_utc(when).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    """The inverse of :func:`format_time`, tolerant: None for a missing or unreadable value."""
    if not value:
        return None
    try:
        return ensure_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        return None


def make_condition(
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> dict[str, Any]:
    """A fresh condition (wire shape); raises ValueError on a shape the API server would refuse."""
    if status not in _VALID_STATUS:
        raise ValueError(f"condition status must be one of {_VALID_STATUS}, not {status!r}")
    if not type_:
        raise ValueError("condition type must not be empty")
    if not reason or not reason[0].isalpha() or not all(c.isalnum() or c in "_,:" for c in reason):
        raise ValueError(f"condition reason must be CamelCase letters/digits, not {reason!r}")
    condition = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message[:_MAX_MESSAGE],
        observed_generation=int(observed_generation),
        last_transition_time=ensure_utc(now).replace(microsecond=0),
    ).to_kube()
    condition["lastTransitionTime"] = format_time(now)  # metav1.Time: seconds, "Z"
    return condition


def get_condition(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for condition in conditions or ():
        if condition.get("type") == type_:
            return condition
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.get("status") == "True"


def set_condition(
    conditions: Iterable[Mapping[str, Any]] | None,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    observed_generation: int,
    now: datetime,
) -> list[dict[str, Any]]:
    """Return a new list with ``type_`` set; other conditions and their order are kept.

    ``lastTransitionTime`` is carried over from the existing condition when its status is the
    same, so only real transitions move it.
    """
    fresh = make_condition(type_, status, reason, message, observed_generation, now)
    result: list[dict[str, Any]] = []
    replaced = False
    for existing in conditions or ():
        if existing.get("type") == type_:
            if existing.get("status") == status and existing.get("lastTransitionTime"):
                fresh["lastTransitionTime"] = existing["lastTransitionTime"]
            result.append(fresh)
            replaced = True
        else:
            result.append(dict(existing))
    if not replaced:
        result.append(fresh)
    return result


def condition_changed(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> bool:
    """True when status, reason or message differ (a transition worth an Event)."""
    if before is None or after is None:
        return before is not after
    return any(before.get(k) != after.get(k) for k in ("status", "reason", "message"))


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any] | None:
    """The minimal JSON merge patch (RFC 7386) turning ``current`` into ``desired``, or None.

    Only keys present in ``desired`` are considered (a handler owns the keys it sets and leaves
    the others, e.g. the metering ledger, alone). Lists are compared whole, as merge patch
    replaces them whole. ``None`` in ``desired`` deletes a key that exists.
    """
    patch = _merge_diff(current or {}, desired)
    return patch or None


def _merge_diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    patch: dict[str, Any] = {}
    for key, want in desired.items():
        have = current.get(key)
        if want is None:
            if key in current and have is not None:
                patch[key] = None
            continue
        if isinstance(want, Mapping) and isinstance(have, Mapping):
            sub = _merge_diff(have, want)
            if sub:
                patch[key] = sub
        elif have != want:
            patch[key] = _plain(want)
    return patch


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
