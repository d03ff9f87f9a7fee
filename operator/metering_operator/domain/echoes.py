"""Which watch events of a MeteredProduct change nothing a handler reads.

While pods flow, the gate, metering and the spec reporter each write the product's status; every
write comes back to every handler as a MODIFIED event. Most of those events are echoes: nothing
the handler reads has changed, and looking again (parsing the spec, resolving pins, comparing
the status, waking the gate's scheduler) would only cost CPU. Each handler keeps, per product, a
fingerprint of exactly what it reads, and skips an event whose fingerprint equals the last one it
acted on. The fingerprints are exact, not heuristic: a spec change moves ``metadata.generation``
(the status subresource keeps status writes from doing so), a recreated product has a new uid,
and the status parts a handler reacts to are compared whole.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Hashable, Mapping
from typing import Any

from metering_operator.domain.conditions import get_condition
from metering_operator.domain.product import ConditionType
from metering_operator.domain.transitions import ENFORCED

Fingerprint = tuple[Any, ...]


def _frozen(value: Any) -> str | None:
    """A copy that later mutation of the body cannot reach, compared by value (JSON is exact for
    what the API server sends: it came as JSON)."""
    if value is None:
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _identity(body: Mapping[str, Any]) -> tuple[Any, Any]:
    meta = body.get("metadata") or {}
    return meta.get("uid"), meta.get("generation")


def _conditions(body: Mapping[str, Any]) -> Any:
    return (body.get("status") or {}).get("conditions")


def gate_fingerprint(body: Mapping[str, Any]) -> Fingerprint:
    """What the gate's controller reacts to when the product changes: its spec (uid and
    generation: the controller re-reads the spec only when they move), the ``Metering`` condition
    (Ready judges it) and ``MeteringHealthy`` (``spec.metering.onFailure`` holds pods on it).
    The gate does not react to its own status parts, labels, annotations or the deletion mark
    (kopf stops its daemon)."""
    conditions = _conditions(body)
    return (
        *_identity(body),
        _frozen(get_condition(conditions, ConditionType.METERING.value)),
        _frozen(get_condition(conditions, ConditionType.METERING_HEALTHY.value)),
    )


def report_fingerprint(body: Mapping[str, Any]) -> Fingerprint | None:
    """What the spec reporter reads: the spec (uid, generation), and the two status parts it owns
    and restores when someone else changes them -- ``status.observedSpec`` and the ``Enforced``
    condition. None for a product being deleted: always looked at."""
    if (body.get("metadata") or {}).get("deletionTimestamp"):
        return None
    status = body.get("status") or {}
    return (
        *_identity(body),
        _frozen(status.get("observedSpec")),
        _frozen(get_condition(status.get("conditions"), ENFORCED)),
    )


class Fingerprints:
    """Per product, the fingerprint of the last event a handler acted on (thread-safe: kopf's loop
    and its executor threads both ask)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[Hashable, Fingerprint] = {}

    def seen(self, key: Hashable, fingerprint: Fingerprint | None) -> bool:
        """True when ``fingerprint`` is the one last remembered for ``key`` (None never is)."""
        if fingerprint is None:
            return False
        with self._lock:
            return self._seen.get(key) == fingerprint

    def remember(self, key: Hashable, fingerprint: Fingerprint | None) -> None:
        with self._lock:
            if fingerprint is None:
                self._seen.pop(key, None)
            else:
                self._seen[key] = fingerprint

    def changed(self, key: Hashable, fingerprint: Fingerprint | None) -> bool:
        """Whether the event is new to the handler; remembers it (for handlers that act on every
        new fingerprint, whatever the outcome)."""
        if self.seen(key, fingerprint):
            return False
        self.remember(key, fingerprint)
        return True

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._seen.pop(key, None)

    def __len__(self) -> int:
        return len(self._seen)
