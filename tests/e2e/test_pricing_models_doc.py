"""docs/pricing-models.md's MeteredProducts are valid as printed: the real API server accepts them.

Every ```yaml block of the page that is a MeteredProduct is created with a server-side dry run
(`dryRun=All`: the CRD's OpenAPI schema and CEL rules run, nothing is stored) in a fresh
namespace. The page must have one per model that has a MeteredProduct, and a broken copy of each
is refused, so the check is the API server's and not a formality.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.cluster

DOC = Path(__file__).resolve().parents[2] / "docs" / "pricing-models.md"
#: The page's examples by name: one per pricing model with a MeteredProduct (free has none).
EXPECTED = {
    "hourly-product": "RegisterUsage",
    "metered-product": None,
    "contract-product": "LicenseManager",
    "contract-consumption-product": "LicenseManager",
}


def doc_examples() -> dict[str, dict[str, Any]]:
    examples: dict[str, dict[str, Any]] = {}
    for block in re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S):
        obj = yaml.safe_load(block)
        if isinstance(obj, dict) and obj.get("kind") == "MeteredProduct":
            name = obj["metadata"]["name"]
            assert name not in examples, f"two examples named {name}"
            examples[name] = obj
    return examples


def dry_run_create(kube: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = client.CustomObjectsApi(kube).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body, dry_run="All"
    )
    return created


def test_the_page_has_one_example_per_model() -> None:
    examples = doc_examples()
    assert set(examples) == set(EXPECTED)
    for name, source in EXPECTED.items():
        entitlement = examples[name]["spec"].get("entitlement") or {}
        assert entitlement.get("source", "RegisterUsage" if source else None) == source or (
            source is None and entitlement.get("mode") == "Off"
        ), (name, entitlement)
    # Contract with consumption is one spec: License Manager entitlement plus metering dimensions.
    consumption = examples["contract-consumption-product"]["spec"]
    assert consumption["entitlement"]["source"] == "LicenseManager"
    assert consumption["metering"]["dimensions"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_example_is_accepted_by_the_api_server(
    kube: client.ApiClient, metered_product_crd: dict[str, Any], namespace: str, name: str
) -> None:
    example = doc_examples()[name]
    created = dry_run_create(kube, namespace, example)
    assert created["metadata"]["name"] == name
    # Defaults applied by the schema show the server really processed it (not stored: dry run).
    assert created["spec"]["entitlement"]["mode"] in {"Enforce", "Audit", "Off"}
    with pytest.raises(ApiException) as missing:
        client.CustomObjectsApi(kube).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert missing.value.status == 404


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_broken_copy_of_each_example_is_refused(
    kube: client.ApiClient, metered_product_crd: dict[str, Any], namespace: str, name: str
) -> None:
    broken = copy.deepcopy(doc_examples()[name])
    broken["spec"]["selector"] = {"matchLabels": "not-a-map"}
    with pytest.raises(ApiException) as refused:
        dry_run_create(kube, namespace, broken)
    assert refused.value.status == 422, refused.value.body
    assert "spec.selector.matchLabels" in str(refused.value.body)


@pytest.mark.parametrize("name", [n for n, source in EXPECTED.items() if source == "LicenseManager"])
def test_the_contract_examples_rules_are_the_crds(
    kube: client.ApiClient, metered_product_crd: dict[str, Any], namespace: str, name: str
) -> None:
    # The CEL rules of entitlement.licenseManager run on the printed examples too.
    both = copy.deepcopy(doc_examples()[name])
    both["spec"]["entitlement"]["licenseManager"]["entitlements"][0]["perCluster"] = 1
    with pytest.raises(ApiException) as refused:
        dry_run_create(kube, namespace, both)
    assert refused.value.status == 422
    assert "exactly one of perPod or perCluster must be set" in str(refused.value.body)
    without = copy.deepcopy(doc_examples()[name])
    del without["spec"]["entitlement"]["licenseManager"]
    with pytest.raises(ApiException) as refused:
        dry_run_create(kube, namespace, without)
    assert "licenseManager must be set exactly when source is LicenseManager" in str(refused.value.body)
