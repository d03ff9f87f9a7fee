"""The chart's opt-in PrometheusRule and Grafana dashboard, rendered by the real Helm CLI.

Each query is parsed as PromQL and every metric and label it uses must be one the operator's
metrics module declares. That a running operator really exports them (samples, label values) is
checked against a scrape of the containerized operator in tests/image/test_container.py.
"""

from __future__ import annotations

import json

import pytest
import yaml

from metering_operator import metrics
from tests.chart.helmcli import Helm, by_kind, one
from tests.chart.monitoring import ALERTS, DASHBOARD, all_expressions, check_queries_against_scrape, selectors

SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}


def declared() -> dict[str, set[str]]:
    """Sample name -> label names, for every metric in the operator's registry."""
    names: dict[str, set[str]] = {}
    for collector in metrics.REGISTRY._collector_to_names:
        labelnames = set(getattr(collector, "_labelnames", ()))
        kind = getattr(collector, "_type", "")
        base = getattr(collector, "_name", "")
        for suffix in SUFFIXES.get(kind, ("",)):
            sample = base + suffix if not (kind == "counter" and suffix == "_total") else base + "_total"
            names[sample] = labelnames | ({"le"} if suffix == "_bucket" else set())
    return names


def test_monitoring_is_opt_in(helm: Helm) -> None:
    kinds = {obj["kind"] for obj in helm.render()}
    assert "PrometheusRule" not in kinds
    assert not [
        cm for cm in by_kind(helm.render(), "ConfigMap") if "grafana_dashboard" in cm["metadata"]["labels"]
    ]


def test_prometheus_rule_carries_the_chart_alerts(helm: Helm) -> None:
    objects = helm.render(
        values={
            "metrics": {"prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}}}
        }
    )
    rule = one(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert {"MarketplaceMeteringHoursUnsent", "MarketplaceMeteringPodsDenied"} <= alerts


def test_dashboard_config_map_follows_the_grafana_sidecar_convention(helm: Helm) -> None:
    objects = helm.render(
        values={"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "monitoring"}}}
    )
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    (content,) = cm["data"].values()
    assert json.loads(content) == json.loads(DASHBOARD.read_text())


@pytest.mark.parametrize(("where", "expr"), sorted(all_expressions().items()))
def test_each_query_parses_and_uses_declared_metrics_and_labels(where: str, expr: str) -> None:
    known = declared()
    used = selectors(expr)  # raises if the expression is not PromQL
    assert used, f"{where}: no metric in {expr!r}"
    for sel in used:
        assert sel.name in known, f"{where}: {sel.name} is not a metric the operator declares"
        missing = (set(sel.equal) | sel.other | sel.grouped_by) - known[sel.name]
        assert not missing, f"{where}: {sel.name} has no label(s) {sorted(missing)}"


def test_scrape_check_names_what_the_operator_does_not_export() -> None:
    """The check used on the real scrape fails, naming the query, for a missing metric or label."""
    exposition = (
        "# TYPE marketplace_metering_pods_gated gauge\n"
        'marketplace_metering_pods_gated{product_code="p",state="Pending"} 0.0\n'
    )
    with pytest.raises(AssertionError) as failure:
        check_queries_against_scrape(exposition)
    message = str(failure.value)
    assert (
        "alert MarketplaceMeteringPodsDenied: marketplace_metering_pods_gated has no label 'namespace'"
        in message
    )
    assert "marketplace_metering_pods_gated{state='Denied'} never appears (seen ['Pending'])" in message
    assert "marketplace_metering_last_sent_hour_timestamp_seconds has no samples in the scrape" in message


def test_scrape_check_still_wants_the_family_of_a_metric_without_samples() -> None:
    ungated = "marketplace_metering_ungated_pods_total"
    with pytest.raises(AssertionError) as failure:
        check_queries_against_scrape("", without_samples=frozenset({ungated}))
    assert f"metric {ungated} is not exported at all" in str(failure.value)
    base = ungated.removesuffix("_total")
    exported = f"# HELP {base} x\n# TYPE {base} counter\n"
    with pytest.raises(AssertionError) as failure:
        check_queries_against_scrape(exported, without_samples=frozenset({ungated}))
    assert ungated not in str(failure.value)
