"""The selector index of the shared pod cache: the same answer as trying every selector."""

from __future__ import annotations

import itertools
import random

from metering_operator.domain.product import LabelSelector
from metering_operator.domain.selector_index import SelectorIndex
from metering_operator.domain.selectors import matches


def sel(labels: dict[str, str] | None = None, *expressions: dict[str, object]) -> LabelSelector:
    return LabelSelector.model_validate({"matchLabels": labels or {}, "matchExpressions": list(expressions)})


def test_anchored_and_unanchored_selectors_are_found() -> None:
    index: SelectorIndex[str] = SelectorIndex()
    index.add("db", sel({"app": "db"}))
    index.add("db-eu", sel({"app": "db", "region": "eu"}))
    index.add("tier", sel(None, {"key": "tier", "operator": "In", "values": ["gold"]}))
    index.add("all", sel())
    assert index.matching({"app": "db"}) == {"db", "all"}
    assert index.matching({"app": "db", "region": "eu", "tier": "gold"}) == {"db", "db-eu", "tier", "all"}
    assert index.matching(None) == {"all"}
    index.remove("all")
    assert not index.selects({"app": "web"})
    assert index.selects({"tier": "gold"})


def test_remove_and_replace() -> None:
    index: SelectorIndex[int] = SelectorIndex()
    index.add(1, sel({"app": "db"}))
    index.add(1, sel({"app": "web"}))  # the key's selector replaced, not added twice
    assert index.matching({"app": "db"}) == set()
    assert index.matching({"app": "web"}) == {1}
    assert len(index) == 1
    assert 1 in index
    index.remove(1)
    index.remove(1)  # twice is harmless
    assert len(index) == 0
    assert index.matching({"app": "web"}) == set()


def test_agrees_with_trying_every_selector() -> None:
    rng = random.Random(12)
    keys = ["app", "tier", "region"]
    values = ["a", "b", "c"]
    operators = ["In", "NotIn", "Exists", "DoesNotExist"]
    selectors: dict[int, LabelSelector] = {}
    index: SelectorIndex[int] = SelectorIndex()
    for n in range(60):
        labels = {k: rng.choice(values) for k in rng.sample(keys, rng.randint(0, 2))}
        expressions = []
        for k in rng.sample(keys, rng.randint(0, 1)):
            op = rng.choice(operators)
            expr: dict[str, object] = {"key": k, "operator": op}
            if op in ("In", "NotIn"):
                expr["values"] = rng.sample(values, 2)
            expressions.append(expr)
        selectors[n] = sel(labels, *expressions)
        index.add(n, selectors[n])
    for n in range(0, 60, 7):
        index.remove(n)
        del selectors[n]
    for combo in itertools.product([None, *values], repeat=len(keys)):
        labels = {k: v for k, v in zip(keys, combo, strict=True) if v is not None}
        expected = {n for n, s in selectors.items() if matches(s, labels)}
        assert index.matching(labels) == expected, labels
