"""Which of many label selectors select a pod, without trying each of them on every pod.

The shared pod cache (:mod:`metering_operator.kube.podcache`) watches every pod of a namespace
and must decide, per pod event, which registered selectors (one per MeteredProduct, for the gate
and for metering) select it -- and drop the pod at once when none does. With 50 products that is
50 selectors per event; most products select on ``matchLabels``, so each selector is filed under
one of its ``(key, value)`` pairs (its *anchor*) and only the selectors anchored on one of the
pod's own labels are tried. Selectors without ``matchLabels`` (expressions only, or empty) are
tried on every pod. Pure and unit-tested; keys are whatever the caller names its selectors by.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from typing import Generic, TypeVar

from metering_operator.domain.product import LabelSelector
from metering_operator.domain.selectors import matches

K = TypeVar("K", bound=Hashable)


class SelectorIndex(Generic[K]):
    """Selectors by key; :meth:`matching` gives the keys of those that select some labels."""

    def __init__(self) -> None:
        self._selectors: dict[K, LabelSelector] = {}
        self._anchored: dict[tuple[str, str], set[K]] = {}
        self._unanchored: set[K] = set()

    def __len__(self) -> int:
        return len(self._selectors)

    def __contains__(self, key: object) -> bool:
        return key in self._selectors

    def __iter__(self) -> Iterator[K]:
        return iter(self._selectors)

    def get(self, key: K) -> LabelSelector | None:
        return self._selectors.get(key)

    def add(self, key: K, selector: LabelSelector) -> None:
        self.remove(key)
        self._selectors[key] = selector
        anchor = _anchor(selector)
        if anchor is None:
            self._unanchored.add(key)
        else:
            self._anchored.setdefault(anchor, set()).add(key)

    def remove(self, key: K) -> None:
        selector = self._selectors.pop(key, None)
        if selector is None:
            return
        anchor = _anchor(selector)
        if anchor is None:
            self._unanchored.discard(key)
            return
        keys = self._anchored.get(anchor)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._anchored[anchor]

    def matching(self, labels: Mapping[str, str] | None) -> set[K]:
        """The keys of the selectors that select a pod with ``labels``."""
        labels = labels or {}
        found: set[K] = set()
        candidates: list[K] = list(self._unanchored)
        if self._anchored:
            for pair in labels.items():
                keys = self._anchored.get(pair)
                if keys:
                    candidates.extend(keys)
        for key in candidates:
            if key not in found and matches(self._selectors[key], labels):
                found.add(key)
        return found

    def selects(self, labels: Mapping[str, str] | None) -> bool:
        """Whether any selector selects ``labels`` (the cache keeps only such pods)."""
        return bool(self.matching(labels))


def _anchor(selector: LabelSelector) -> tuple[str, str] | None:
    if not selector.match_labels:
        return None
    key = min(selector.match_labels)
    return key, selector.match_labels[key]
