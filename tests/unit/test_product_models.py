"""The MeteredProduct models: wire round-trips, defaults, validation, and the CRD derived from them."""

from __future__ import annotations

import copy
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from metering_operator.commands.manifests import SAMPLE
from metering_operator.domain import crd, product
from metering_operator.domain.product import (
    Aggregation,
    DimensionSource,
    EntitlementMode,
    EntitlementScope,
    LedgerEntry,
    LedgerState,
    MeteredProduct,
    MeteredProductSpec,
    MeteredProductStatus,
    Rounding,
)
from tests.samples import status_wire

PEM = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "productCode": "1fszvu527waovqeuhpkyx2b5d",
        "publicKeyVersion": 1,
        "publicKey": {"pem": PEM},
        "selector": {"matchLabels": {"app": "x"}},
    }
    spec.update(overrides)
    return spec


def dimension(name: str = "replicas", **overrides: Any) -> dict[str, Any]:
    return {"name": name, "source": "ReadyPods", **overrides}


# --- round-trips and defaults -------------------------------------------------------------------------


def test_sample_round_trips_through_the_models() -> None:
    parsed = MeteredProduct.from_kube(copy.deepcopy(SAMPLE))
    assert parsed.spec.product_code == SAMPLE["spec"]["productCode"]
    assert parsed.spec.metering.dimensions[0].allocations is not None
    assert parsed.spec.metering.dimensions[0].allocations.tags[0].from_ is product.TagSource.NAMESPACE
    wire = parsed.spec.to_kube()
    # The sample spells out every default except the empty matchExpressions.
    expected = copy.deepcopy(SAMPLE["spec"])
    expected["selector"]["matchExpressions"] = []
    assert wire == expected
    assert MeteredProductSpec.model_validate(wire) == parsed.spec


def test_defaults_of_a_minimal_spec() -> None:
    spec = MeteredProductSpec.model_validate(minimal_spec(metering={"dimensions": [dimension()]}))
    assert spec.entitlement.mode is EntitlementMode.ENFORCE
    assert spec.entitlement.scope is EntitlementScope.POD
    assert spec.metering.dry_run is False
    assert spec.metering.sample_interval_seconds == 60
    dim = spec.metering.dimensions[0]
    assert dim.aggregation is Aggregation.AVERAGE
    assert dim.rounding is Rounding.UP
    assert dim.source is DimensionSource.READY_PODS
    assert dim.allocations is None
    assert spec.dimension("replicas") is dim
    assert spec.dimension("absent") is None
    assert spec.to_kube()["entitlement"] == {"mode": "Enforce", "scope": "Pod", "source": "RegisterUsage"}


def test_snake_case_names_are_accepted_and_serialised_camel_case() -> None:
    spec = MeteredProductSpec(
        product_code="abc",
        public_key_version=2,
        public_key=product.PublicKeySource(config_map_key_ref=product.ConfigMapKeyRef(name="k", key="pem")),
        selector=product.LabelSelector(match_labels={"a": "b"}),
    )
    wire = spec.to_kube()
    assert wire["publicKeyVersion"] == 2
    assert wire["publicKey"] == {"configMapKeyRef": {"name": "k", "key": "pem"}}
    assert "pem" not in wire["publicKey"], "unset optionals must not be sent as null"


def test_from_kube_takes_metadata_and_tolerates_missing_or_unknown_status() -> None:
    obj = {
        "apiVersion": product.API_VERSION,
        "kind": product.KIND,
        "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "generation": 4, "resourceVersion": "9"},
        "spec": minimal_spec(),
        "status": None,
    }
    parsed = MeteredProduct.from_kube(obj)
    assert parsed.key == "ns/p"
    assert parsed.metadata.generation == 4
    assert parsed.status == MeteredProductStatus()
    obj["status"] = {"observedGeneration": 3, "someFutureField": {"x": 1}, "pods": {"registered": 2}}
    status = MeteredProduct.from_kube(obj).status
    assert status.observed_generation == 3
    assert status.pods.registered == 2


def test_status_round_trips_with_exact_decimals_and_utc_times() -> None:
    hour = datetime(2026, 11, 26, 3, tzinfo=UTC)
    wire = status_wire()
    status = MeteredProductStatus.model_validate(wire)
    entry = status.metering.ledger[0]
    assert entry.quantity == Decimal("17.50")
    assert entry.state is LedgerState.SENT
    assert entry.hour == hour
    assert status.metering.open_hour is not None
    assert status.metering.open_hour.dimensions[0].weighted_sum == Decimal("1800.000001")
    assert status.condition("Ready") is not None
    assert status.condition("Metering") is None
    out = status.to_kube()
    # Trailing zeros survive: the quantity sent is exactly the quantity recorded.
    assert out["metering"]["ledger"][0]["quantity"] == "17.50"
    assert out["metering"]["openHour"]["dimensions"][0]["weightedSum"] == "1800.000001"
    assert out["metering"]["lastSentHour"] == "2026-11-26T03:00:00Z"
    assert out["conditions"][0]["lastTransitionTime"] == "2026-11-26T03:04:05Z"
    assert MeteredProductStatus.model_validate(out) == status


def test_decimals_serialise_without_exponent_or_negative_zero() -> None:
    entry = LedgerEntry(hour=datetime(2026, 1, 1, tzinfo=UTC), dimension="d", quantity=Decimal("1E+3"))
    assert entry.to_kube()["quantity"] == "1000"
    zero = LedgerEntry(hour=datetime(2026, 1, 1, tzinfo=UTC), dimension="d", quantity=Decimal("-0"))
    assert zero.to_kube()["quantity"] == "0"
    assert re.fullmatch(product.DECIMAL_PATTERN, entry.to_kube()["quantity"])


@pytest.mark.parametrize("quantity", ["-1", "NaN", "Infinity", "abc"])
def test_ledger_quantity_must_be_a_finite_non_negative_decimal(quantity: str) -> None:
    with pytest.raises(ValidationError) as err:
        LedgerEntry.model_validate({"hour": "2026-01-01T00:00:00Z", "dimension": "d", "quantity": quantity})
    assert err.value.errors()[0]["loc"] == ("quantity",)


def test_times_are_normalised_to_utc_and_hours_must_be_whole() -> None:
    plus_two = timezone(timedelta(hours=2))
    entry = LedgerEntry(hour=datetime(2026, 1, 1, 5, tzinfo=plus_two), dimension="d", quantity=Decimal(1))
    assert entry.hour == datetime(2026, 1, 1, 3, tzinfo=UTC)
    assert entry.hour.tzinfo is UTC
    with pytest.raises(ValidationError, match="not the start of an hour"):
        LedgerEntry.model_validate({"hour": "2026-01-01T03:30:00Z", "dimension": "d", "quantity": "1"})
    with pytest.raises(ValidationError) as err:
        LedgerEntry.model_validate({"hour": "2026-01-01T03:00:00", "dimension": "d", "quantity": "1"})
    assert err.value.errors()[0]["type"] == "timezone_aware"


def test_metering_only_product_needs_no_public_key() -> None:
    spec_data = minimal_spec(entitlement={"mode": "Off"}, metering={"dimensions": [dimension()]})
    del spec_data["publicKey"]
    spec = MeteredProductSpec.model_validate(spec_data)
    assert spec.public_key is None
    assert spec.entitlement.mode is EntitlementMode.OFF


def license_manager(**overrides: Any) -> dict[str, Any]:
    return {"productSKU": "prod-hlrud2qqsxrgq", "entitlements": [{"name": "seats", "perPod": 1}], **overrides}


def contract(**overrides: Any) -> dict[str, Any]:
    """Spec overrides for a License Manager product, with ``overrides`` in its licenseManager."""
    return {"entitlement": {"source": "LicenseManager", "licenseManager": license_manager(**overrides)}}


def test_contract_with_consumption_is_one_spec_and_needs_no_register_usage_key() -> None:
    spec_data = minimal_spec(
        entitlement={
            "scope": "Pod",
            "source": "LicenseManager",
            "licenseManager": {
                "productSKU": "prod-hlrud2qqsxrgq",
                "entitlements": [
                    {"name": "seats", "perPod": 1},
                    {"name": "premium", "unit": "None", "perCluster": 1},
                ],
                "issuerPublicKey": {"pem": PEM},
            },
        },
        metering={"dimensions": [dimension("overage_vcpu", source="CPURequests")]},
    )
    del spec_data["publicKey"]
    spec = MeteredProductSpec.model_validate(spec_data)
    assert spec.entitlement.source is product.EntitlementSource.LICENSE_MANAGER
    lm = spec.entitlement.license_manager
    assert lm is not None
    assert lm.key_fingerprint == "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
    assert lm.checkout_type is product.CheckoutType.PROVISIONAL
    assert [(e.name, e.unit, e.per_pod, e.per_cluster) for e in lm.entitlements] == [
        ("seats", "Count", 1, None),
        ("premium", "None", None, 1),
    ]
    wire = spec.to_kube()
    assert wire["entitlement"]["licenseManager"]["productSKU"] == "prod-hlrud2qqsxrgq"
    assert "publicKey" not in wire
    assert MeteredProductSpec.model_validate(wire) == spec


# --- validation errors -------------------------------------------------------------------------------

# (case id, spec overrides or a callable editing the spec, text the error must contain)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("bad product code", {"productCode": "bad code!"}, "productCode"),
    ("empty product code", {"productCode": ""}, "productCode"),
    ("version 0", {"publicKeyVersion": 0}, "publicKeyVersion"),
    ("version not a number", {"publicKeyVersion": "one"}, "publicKeyVersion"),
    (
        "unknown source",
        {"metering": {"dimensions": [dimension(source="Bananas")]}},
        "metering.dimensions.0.source",
    ),
    (
        "bad rounding",
        {"metering": {"dimensions": [dimension(rounding="Sideways")]}},
        "metering.dimensions.0.rounding",
    ),
    (
        "bad aggregation",
        {"metering": {"dimensions": [dimension(aggregation="Median")]}},
        "metering.dimensions.0.aggregation",
    ),
    (
        "six tags",
        {
            "metering": {
                "dimensions": [
                    dimension(allocations={"tags": [{"key": f"k{i}", "from": "Namespace"} for i in range(6)]})
                ]
            }
        },
        "metering.dimensions.0.allocations.tags",
    ),
    (
        "duplicate dimensions",
        {"metering": {"dimensions": [dimension("a"), dimension("a", source="Replicas")]}},
        "duplicate dimension names: a",
    ),
    (
        "duplicate tag keys",
        {
            "metering": {
                "dimensions": [
                    dimension(
                        allocations={
                            "tags": [{"key": "t", "from": "Namespace"}, {"key": "t", "fromLabel": "x"}]
                        }
                    )
                ]
            }
        },
        "duplicate tag keys: t",
    ),
    (
        "tag with both sources",
        {
            "metering": {
                "dimensions": [
                    dimension(allocations={"tags": [{"key": "t", "from": "Namespace", "fromLabel": "x"}]})
                ]
            }
        },
        "exactly one of from or fromLabel",
    ),
    (
        "tag with no source",
        {"metering": {"dimensions": [dimension(allocations={"tags": [{"key": "t"}]})]}},
        "exactly one of from or fromLabel",
    ),
    (
        "bad tag key",
        {
            "metering": {
                "dimensions": [dimension(allocations={"tags": [{"key": "a{b}", "from": "Namespace"}]})]
            }
        },
        "metering.dimensions.0.allocations.tags.0.key",
    ),
    (
        "bad dimension name",
        {"metering": {"dimensions": [dimension("has space")]}},
        "metering.dimensions.0.name",
    ),
    (
        "both pem and configMapKeyRef",
        {"publicKey": {"pem": PEM, "configMapKeyRef": {"name": "a", "key": "b"}}},
        "exactly one of configMapKeyRef or pem",
    ),
    ("neither pem nor configMapKeyRef", {"publicKey": {}}, "exactly one of configMapKeyRef or pem"),
    ("pem that is not PEM", {"publicKey": {"pem": "ssh-rsa AAAA"}}, "publicKey.pem"),
    ("entitlement off and no dimensions", {"entitlement": {"mode": "Off"}}, "neither entitled nor metered"),
    ("unknown mode", {"entitlement": {"mode": "Sometimes"}}, "entitlement.mode"),
    (
        "sample interval too short",
        {"metering": {"sampleIntervalSeconds": 4}},
        "metering.sampleIntervalSeconds",
    ),
    (
        "In without values",
        {"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "values must be non-empty for In and NotIn",
    ),
    ("misspelt field", {"productcode": "x"}, "productcode"),
    (
        "license manager source without licenseManager",
        {"entitlement": {"source": "LicenseManager"}},
        "licenseManager must be set exactly when source is LicenseManager",
    ),
    (
        "licenseManager with the RegisterUsage source",
        {"entitlement": {"licenseManager": license_manager()}},
        "licenseManager must be set exactly when source is LicenseManager",
    ),
    ("unknown entitlement source", {"entitlement": {"source": "Vibes"}}, "entitlement.source"),
    # minimal_spec has a RegisterUsage publicKey: a License Manager product must not carry one.
    ("license manager product with a publicKey", contract(), "must not be set when entitlement.source"),
    (
        "entitlement with perPod and perCluster",
        contract(entitlements=[{"name": "seats", "perPod": 1, "perCluster": 3}]),
        "exactly one of perPod or perCluster",
    ),
    (
        "entitlement with no amount",
        contract(entitlements=[{"name": "seats"}]),
        "exactly one of perPod or perCluster",
    ),
    (
        "feature with an amount above 1",
        contract(entitlements=[{"name": "premium", "unit": "None", "perCluster": 2}]),
        "its perPod or perCluster must be 1",
    ),
    (
        "zero seats per pod",
        contract(entitlements=[{"name": "seats", "perPod": 0}]),
        "entitlement.licenseManager.entitlements.0.perPod",
    ),
    (
        "unknown unit",
        contract(entitlements=[{"name": "seats", "unit": "Seats", "perPod": 1}]),
        "entitlement.licenseManager.entitlements.0.unit",
    ),
    (
        "duplicate entitlements",
        contract(entitlements=[{"name": "seats", "perPod": 1}, {"name": "seats", "perCluster": 1}]),
        "duplicate entitlement names: seats",
    ),
    ("no entitlements", contract(entitlements=[]), "entitlement.licenseManager.entitlements"),
    (
        "bad key fingerprint",
        contract(keyFingerprint="aws:marketplace"),
        "entitlement.licenseManager.keyFingerprint",
    ),
    ("bad product SKU", contract(productSKU="prod 1"), "entitlement.licenseManager.productSKU"),
    (
        "unknown checkout type",
        contract(checkoutType="PROVISIONAL"),
        "entitlement.licenseManager.checkoutType",
    ),
    ("selector not an object", {"selector": "app=x"}, "selector"),
]


@pytest.mark.parametrize(
    ("overrides", "expected"), [case[1:] for case in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_specs_are_refused_naming_the_problem(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as err:
        MeteredProductSpec.model_validate(minimal_spec(**overrides))
    rendered = str(err.value)
    assert expected in rendered, rendered


def test_missing_product_code_and_public_key_are_refused() -> None:
    spec = minimal_spec()
    del spec["productCode"]
    with pytest.raises(ValidationError) as err:
        MeteredProductSpec.model_validate(spec)
    assert ("productCode",) in [e["loc"] for e in err.value.errors()]
    spec = minimal_spec()
    del spec["publicKey"]
    with pytest.raises(ValidationError, match=r"publicKey is required unless entitlement\.mode is Off"):
        MeteredProductSpec.model_validate(spec)


# --- the CRD schema derived from the models ----------------------------------------------------------


def _walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for name, sub in node.get("properties", {}).items():
        found += _walk(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        found += _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += _walk(node["additionalProperties"], f"{path}{{}}")
    return found


def test_crd_schema_is_structural_and_documented() -> None:
    schema = crd.openapi_schema()
    nodes = _walk(schema)
    assert len(nodes) > 60
    for path, node in nodes:
        assert "type" in node, path
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
            assert forbidden not in node, f"{path}: {forbidden}"
        assert not ("properties" in node and "additionalProperties" in node), path
    for path, node in nodes:
        # metadata's schema is the API server's own; a CRD may only say it is an object.
        if path and path != ".metadata" and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


def _model_paths(model: type[BaseModel], prefix: str) -> set[str]:
    """Every camelCase field path of a model, following nested models through lists and optionals."""
    paths: set[str] = set()
    for name, field in model.model_fields.items():
        alias = field.alias or name
        path = f"{prefix}.{alias}"
        paths.add(path)
        nested = _nested_model(field.annotation)
        if nested is not None:
            inner, through_list = nested
            paths |= _model_paths(inner, path + ("[]" if through_list else ""))
    return paths


def _nested_model(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    args = getattr(annotation, "__args__", ())
    origin = getattr(annotation, "__origin__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    for arg in args:
        found = _nested_model(arg)
        if found is not None:
            return found[0], found[1] or origin is list
    return None


def test_crd_has_exactly_the_model_fields() -> None:
    schema = crd.openapi_schema()
    crd_paths = {p for p, _ in _walk(schema) if p and not p.endswith(("[]", "{}"))}
    model_paths = _model_paths(MeteredProductSpec, ".spec") | _model_paths(MeteredProductStatus, ".status")
    model_paths |= {".spec", ".status", ".apiVersion", ".kind", ".metadata"}
    assert crd_paths == model_paths


def _node(path: str) -> dict[str, Any]:
    node = crd.openapi_schema()
    for part in path.split("."):
        node = node["items"] if part == "[]" else node["properties"][part]
    return node


def test_crd_carries_patterns_enums_defaults_and_limits() -> None:
    assert _node("spec.productCode")["pattern"] == product.PRODUCT_CODE_PATTERN
    assert _node("spec.productCode")["maxLength"] == 255
    assert _node("spec.publicKeyVersion")["minimum"] == 1
    dim = _node("spec.metering.dimensions.[]")
    assert dim["required"] == ["name", "source"]
    assert dim["properties"]["name"]["pattern"] == product.DIMENSION_NAME_PATTERN
    assert dim["properties"]["source"]["enum"] == [
        "Replicas",
        "ReadyPods",
        "CPURequests",
        "MemoryRequestsGiB",
    ]
    assert dim["properties"]["aggregation"]["default"] == "Average"
    assert dim["properties"]["rounding"]["enum"] == ["Up", "Nearest", "Down", "Decimal"]
    assert dim["properties"]["rounding"]["default"] == "Up"
    tags = _node("spec.metering.dimensions.[].allocations.tags")
    assert tags["maxItems"] == 5
    assert tags["x-kubernetes-list-map-keys"] == ["key"]
    assert tags["items"]["properties"]["key"]["pattern"] == product.TAG_PATTERN
    assert _node("spec.metering.dimensions")["x-kubernetes-list-map-keys"] == ["name"]
    assert _node("spec.metering.dimensions")["maxItems"] == product.MAX_DIMENSIONS
    interval = _node("spec.metering.sampleIntervalSeconds")
    assert (interval["default"], interval["minimum"]) == (60, 5)
    assert _node("spec.entitlement")["default"] == {}
    assert _node("spec.entitlement.mode")["default"] == "Enforce"
    assert _node("spec.metering")["default"] == {}
    assert _node("status.metering.ledger.[].quantity")["pattern"] == product.DECIMAL_PATTERN
    assert _node("status.metering.ledger")["x-kubernetes-list-map-keys"] == ["hour", "dimension"]
    assert _node("status.conditions")["x-kubernetes-list-map-keys"] == ["type"]
    # Status is the operator's to write: no API-server defaults there.
    assert not [p for p, n in _walk(_node("status")) if "default" in n]


def test_crd_cel_rules_sit_on_the_right_objects() -> None:
    def rules(path: str) -> list[str]:
        return [r["rule"] for r in _node(path).get("x-kubernetes-validations", [])]

    assert any("size(self.metering.dimensions) > 0" in r for r in rules("spec"))
    assert any("has(self.publicKey)" in r for r in rules("spec"))
    assert rules("spec.publicKey") == ["has(self.configMapKeyRef) != has(self.pem)"]
    assert rules("spec.metering.dimensions.[].allocations.tags.[]") == [
        "has(self.from) != has(self.fromLabel)"
    ]
    assert len(rules("spec.selector.matchExpressions.[]")) == 1
    # The one transition rule: a product keeps its code (mirrored by transitions.immutable_changes).
    assert rules("spec.productCode") == ["self == oldSelf"]


def test_every_pattern_in_the_crd_compiles_and_accepts_the_sample() -> None:
    for path, node in _walk(crd.openapi_schema()):
        if "pattern" in node:
            re.compile(node["pattern"])  # Go RE2 syntax is a subset of what these use
            assert "(?" not in node["pattern"], f"{path}: lookarounds/flags are not RE2"
    assert re.fullmatch(product.TAG_PATTERN, "namespace")
    assert not re.fullmatch(product.TAG_PATTERN, "a{b}")


def test_printer_columns() -> None:
    version = crd.build_crd()["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Product": ".spec.productCode",
        "Mode": ".spec.entitlement.mode",
        "Entitled": ".status.pods.registered",
        "Denied": ".status.pods.denied",
        "Last Metered Hour": ".status.metering.lastSentHour",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Age": ".metadata.creationTimestamp",
    }
    assert version["subresources"] == {"status": {}}
    names = crd.build_crd()["spec"]["names"]
    assert names["shortNames"] == ["mprod"]
    assert names["plural"] == product.PLURAL


class _Union(BaseModel):
    value: int | str = 0


class _Undocumented(BaseModel):
    value: int = 0


def test_generator_refuses_what_it_cannot_translate() -> None:
    with pytest.raises(crd.SchemaError, match="union of 2 types"):
        crd.structural(_Union)
    with pytest.raises(crd.SchemaError, match="needs a description"):
        crd.structural(_Undocumented)


def test_from_kube_accepts_read_only_mapping_views() -> None:
    # kopf passes Body/Spec objects: Mappings, not dicts.
    spec = minimal_spec(metering={"dimensions": [MappingProxyType(dimension())]})
    obj = MappingProxyType({"metadata": MappingProxyType({"name": "p"}), "spec": MappingProxyType(spec)})
    parsed = MeteredProduct.from_kube(obj)
    assert parsed.spec.metering.dimensions[0].name == "replicas"
