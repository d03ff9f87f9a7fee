"""Generated copies stay in sync: the chart's CRDs with manifests/crd, and the install bundle with the chart.

Fix a failure with `.venv/bin/python -m tests.chart.sync` (after `metering-operator manifests` when the
models changed).
"""

from __future__ import annotations

import difflib

import yaml

from tests.chart.helmcli import CHART, CHART_POLICIES, CRD_SOURCE, INSTALL_BUNDLE, POLICY_SOURCE, Helm
from tests.chart.sync import render_bundle

HINT = "run `.venv/bin/python -m tests.chart.sync`"


def test_chart_crds_are_identical_to_manifests() -> None:
    sources = {p.name: p.read_bytes() for p in CRD_SOURCE.glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert sources, f"no CRDs in {CRD_SOURCE}"
    assert sorted(copies) == sorted(sources), (
        f"chart crds/ holds {sorted(copies)}, manifests {sorted(sources)}: {HINT}"
    )
    for name, content in sources.items():
        assert copies[name] == content, f"charts/.../crds/{name} differs from manifests/crd/{name}: {HINT}"
    for content in copies.values():
        for doc in yaml.safe_load_all(content):
            if doc:
                assert doc["kind"] == "CustomResourceDefinition"


def test_chart_policy_fragments_are_identical_to_manifests() -> None:
    assert POLICY_SOURCE.is_file(), f"{POLICY_SOURCE} is missing: run `make manifests`"
    assert CHART_POLICIES.is_file(), f"{CHART_POLICIES} is missing: {HINT}"
    assert CHART_POLICIES.read_bytes() == POLICY_SOURCE.read_bytes(), (
        f"{CHART_POLICIES} differs from {POLICY_SOURCE}: {HINT}"
    )


def test_install_bundle_matches_the_chart(helm: Helm) -> None:
    assert INSTALL_BUNDLE.exists(), f"{INSTALL_BUNDLE} is missing: {HINT}"
    expected = render_bundle(helm)
    actual = INSTALL_BUNDLE.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(True), expected.splitlines(True), "committed", "rendered", n=2
            )
        )
        raise AssertionError(f"{INSTALL_BUNDLE.name} is stale ({HINT}):\n{diff[:4000]}")


def test_install_bundle_is_complete() -> None:
    objects = [doc for doc in yaml.safe_load_all(INSTALL_BUNDLE.read_text()) if doc]
    kinds = {o["kind"] for o in objects}
    assert {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "Deployment",
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "ClusterRole",
        "Role",
    } <= kinds
    assert "Secret" not in kinds, "the bundle must not carry a private key"
    assert "MutatingWebhookConfiguration" not in kinds, "on >= 1.36 the gate needs no webhook"
    namespace = next(o for o in objects if o["kind"] == "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] in ("Deployment", "ServiceAccount", "Service", "Certificate"):
            assert obj["metadata"]["namespace"] == namespace
