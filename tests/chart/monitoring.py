"""The chart's alert rules and Grafana dashboard, read as PromQL and checked against real metrics.

Every expression is parsed with ``promql_parser`` (the Rust PromQL parser's Python binding); the
walk collects what each one needs from the operator: metric names, the labels its matchers and
``by (...)`` groupings use, and the values its equality matchers expect. ``check_queries_against_
scrape`` then holds that against a Prometheus text exposition scraped from a running operator.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml
from prometheus_client.parser import text_string_to_metric_families

CHART = Path(__file__).resolve().parents[2] / "charts" / "marketplace-metering-operator"
ALERTS = CHART / "files" / "alerts.yaml"
DASHBOARD = CHART / "files" / "dashboard.json"


@dataclass
class Selector:
    """One metric selector and the aggregations it sits under."""

    name: str
    equal: dict[str, str]  # label -> value of `=` matchers
    other: set[str]  # labels of !=, =~, !~ matchers
    grouped_by: set[str] = field(default_factory=set)


def rule_expressions() -> dict[str, str]:
    """Alert name -> expression, from the chart's rule groups."""
    groups = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard_expressions() -> dict[str, str]:
    """``<panel title> [<refId>]`` -> expression, from the chart's dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        f"{panel['title']} [{target['refId']}]": target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }


def all_expressions() -> dict[str, str]:
    return {**{f"alert {k}": v for k, v in rule_expressions().items()}, **dashboard_expressions()}


def selectors(expr: str) -> list[Selector]:
    """The metric selectors of one PromQL expression (ValueError if it does not parse)."""
    found: list[Selector] = []
    _walk(promql_parser.parse(expr), set(), found)
    return found


def _walk(node: Any, grouping: set[str], out: list[Selector]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        equal: dict[str, str] = {}
        other: set[str] = set()
        for matcher in node.matchers.matchers:
            if matcher.name == "__name__":
                continue
            if matcher.op == promql_parser.MatchOp.Equal:
                equal[matcher.name] = matcher.value
            else:
                other.add(matcher.name)
        out.append(Selector(str(node.name), equal, other, set(grouping)))
    elif isinstance(node, promql_parser.MatrixSelector):
        _walk(node.vector_selector, grouping, out)
    elif isinstance(node, promql_parser.AggregateExpr):
        labels = set(node.modifier.labels) if node.modifier is not None else set()
        by = node.modifier is not None and node.modifier.type == promql_parser.AggModifierType.By
        _walk(node.expr, grouping | labels if by else grouping, out)
        if node.param is not None:
            _walk(node.param, grouping, out)
    elif isinstance(node, promql_parser.BinaryExpr):
        _walk(node.lhs, grouping, out)
        _walk(node.rhs, grouping, out)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            _walk(arg, grouping, out)
    elif isinstance(node, (promql_parser.ParenExpr, promql_parser.UnaryExpr, promql_parser.SubqueryExpr)):
        _walk(node.expr, grouping, out)
    elif not isinstance(node, (promql_parser.NumberLiteral, promql_parser.StringLiteral)):
        raise TypeError(f"PromQL node {type(node).__name__} is not understood by this walk")


def _samples(exposition: str) -> Iterator[tuple[str, dict[str, str]]]:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            yield sample.name, dict(sample.labels)


def check_queries_against_scrape(exposition: str, *, without_samples: frozenset[str] = frozenset()) -> None:
    """AssertionError listing every metric, label or label value a query uses that the scrape lacks.

    ``without_samples``: metrics the scraped run had no reason to record (a counter of events that
    did not happen); for those the scrape must still export the family (HELP/TYPE), and their
    labels are checked against the declaration in tests/chart/test_monitoring.py only.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    for name, sample_labels in _samples(exposition):
        labels[name].update(sample_labels)
        for key, value in sample_labels.items():
            values[(name, key)].add(value)
    families = {family.name for family in text_string_to_metric_families(exposition)}
    problems = []
    for where, expr in all_expressions().items():
        for sel in selectors(expr):
            if sel.name in without_samples:
                if sel.name.removesuffix("_total") not in families:
                    problems.append(f"{where}: metric {sel.name} is not exported at all")
                continue
            if sel.name not in labels:
                problems.append(f"{where}: metric {sel.name} has no samples in the scrape")
                continue
            # `le` is the bucket label the histogram_quantile grouping needs.
            for label in sorted((set(sel.equal) | sel.other | sel.grouped_by) - labels[sel.name]):
                problems.append(
                    f"{where}: {sel.name} has no label {label!r} (has {sorted(labels[sel.name])})"
                )
            for label, value in sel.equal.items():
                seen = values.get((sel.name, label), set())
                if label in labels[sel.name] and value not in seen:
                    problems.append(
                        f"{where}: {sel.name}{{{label}={value!r}}} never appears (seen {sorted(seen)})"
                    )
    assert not problems, "queries that do not match what the operator exports:\n" + "\n".join(problems)
