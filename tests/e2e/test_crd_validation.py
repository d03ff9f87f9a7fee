"""The generated MeteredProduct CRD against the real kube-apiserver.

The committed CRD is installed as it is; the API server then accepts the sample, applies the schema
defaults, shows the printer columns, serves the descriptions to `kubectl explain`, and refuses a table
of invalid objects, each with a message naming the offending field. Every case of the table is also
fed to the pydantic models, which must agree: the CEL rules and the model validators are the same
rules written twice.
"""

from __future__ import annotations

import copy
import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devtools.cluster import ClusterInfo
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator.commands import manifests
from metering_operator.domain import product
from metering_operator.domain.product import MeteredProduct, MeteredProductStatus
from tests.samples import status_wire

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "manifests" / manifests.CRD_PATH
SAMPLE_FILE = REPO / "manifests" / manifests.SAMPLE_PATH
ESTABLISH_TIMEOUT = 60.0
# The aggregated OpenAPI document that `kubectl explain` reads is rebuilt shortly after a CRD
# changes; allow for a busy machine.
EXPLAIN_TIMEOUT = 90.0

PEM = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n-----END PUBLIC KEY-----\n"


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def crd_installed(kube: client.ApiClient) -> dict[str, Any]:
    """Install (or update to) the committed CRD and wait until it is Established.

    It is left installed: other tests sharing the cluster may have MeteredProducts, and deleting
    the CRD would delete them.
    """
    body: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    ext = client.ApiextensionsV1Api(kube)
    name = body["metadata"]["name"]
    for _attempt in range(10):
        try:
            ext.create_custom_resource_definition(body=body)
            break
        except ApiException as err:
            if err.status != 409:
                raise
        # Already there (another session, or the chart): update it to the committed schema. The
        # API server writes the CRD's status meanwhile, so a stale resourceVersion is retried.
        current = ext.read_custom_resource_definition(name)
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        try:
            ext.replace_custom_resource_definition(name, body=body)
            break
        except ApiException as err:
            if err.status != 409:
                raise
        del body["metadata"]["resourceVersion"]
    else:
        raise RuntimeError(f"could not install {name}: kept conflicting")
    deadline = time.monotonic() + ESTABLISH_TIMEOUT
    while True:
        crd = ext.read_custom_resource_definition(name)
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True":
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD not Established after {ESTABLISH_TIMEOUT:.0f}s: {conditions}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def crd_namespace(kube: client.ApiClient, crd_installed: dict[str, Any]) -> Iterator[str]:
    """One namespace for the whole module; these tests need no ServiceAccount in it."""
    core = client.CoreV1Api(kube)
    ns = core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(generate_name="crd-", labels={"mmo.test/temporary": "true"})
        )
    )
    name: str = ns.metadata.name
    try:
        yield name
    finally:
        core.delete_namespace(name, propagation_policy="Background")


@pytest.fixture(scope="module")
def custom(kube: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(kube)


def kubectl(cluster: ClusterInfo, *args: str) -> str:
    result = subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)} failed: {result.stderr}"
    return result.stdout


def sample() -> dict[str, Any]:
    obj: dict[str, Any] = yaml.safe_load(SAMPLE_FILE.read_text())
    obj["metadata"]["name"] = f"p-{uuid.uuid4().hex[:8]}"
    return obj


def create(custom: client.CustomObjectsApi, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    created: dict[str, Any] = custom.create_namespaced_custom_object(
        product.GROUP, product.VERSION, namespace, product.PLURAL, obj
    )
    return created


# --- accepted ----------------------------------------------------------------------------------------


def test_sample_is_accepted_and_round_trips(custom: client.CustomObjectsApi, crd_namespace: str) -> None:
    obj = sample()
    created = create(custom, crd_namespace, obj)
    assert created["spec"] == obj["spec"]
    parsed = MeteredProduct.from_kube(created)
    assert parsed.metadata.namespace == crd_namespace
    assert parsed.spec.to_kube() == {
        **obj["spec"],
        "selector": {**obj["spec"]["selector"], "matchExpressions": []},
    }


def test_api_server_applies_the_model_defaults(custom: client.CustomObjectsApi, crd_namespace: str) -> None:
    obj = sample()
    obj["spec"] = {
        "productCode": "prod-defaults",
        "publicKeyVersion": 1,
        "publicKey": {"pem": PEM},
        "selector": {},
        "metering": {"dimensions": [{"name": "replicas", "source": "Replicas"}]},
    }
    stored = create(custom, crd_namespace, obj)["spec"]
    model_defaults = product.MeteredProductSpec.model_validate(obj["spec"]).to_kube()
    defaults = {"mode": "Enforce", "scope": "Pod", "source": "RegisterUsage"}
    assert stored["entitlement"] == defaults == model_defaults["entitlement"]
    assert stored["metering"]["dryRun"] is False
    assert stored["metering"]["sampleIntervalSeconds"] == 60
    assert stored["metering"]["onFailure"] == {"action": "Report", "afterHours": 3}
    assert stored["metering"]["onFailure"] == model_defaults["metering"]["onFailure"]
    assert stored["metering"]["dimensions"][0] == model_defaults["metering"]["dimensions"][0]
    assert stored["metering"]["dimensions"][0]["rounding"] == "Up"


def _license_manager(**overrides: Any) -> dict[str, Any]:
    return {"productSKU": "prod-hlrud2qqsxrgq", "entitlements": [{"name": "seats", "perPod": 1}], **overrides}


def _contract(spec: dict[str, Any], *, keep_public_key: bool = False, **overrides: Any) -> None:
    """Make ``spec`` a License Manager product (contract with consumption: it keeps its dimensions)."""
    spec["entitlement"].update(source="LicenseManager", licenseManager=_license_manager(**overrides))
    if not keep_public_key:
        spec.pop("publicKey", None)


def _perpetual_contract(spec: dict[str, Any]) -> None:
    _contract(
        spec,
        checkoutType="Perpetual",
        issuerPublicKey={"pem": PEM},
        entitlements=[
            {"name": "seats", "perCluster": 3},
            {"name": "premium", "unit": "None", "perPod": 1},
            {"name": "storage", "unit": "Gigabytes", "perPod": 10},
        ],
    )
    spec.update(metering={})


# Valid variants: both the API server and the models accept each.
VALID: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
    ("metering only, no public key", lambda s: (s.update(entitlement={"mode": "Off"}), s.pop("publicKey"))),
    (
        "audit, cluster scope, pem",
        lambda s: s.update(entitlement={"mode": "Audit", "scope": "Cluster"}, publicKey={"pem": PEM}),
    ),
    ("hourly only, no dimensions", lambda s: s.update(metering={})),
    (
        "selector expressions",
        lambda s: s.update(
            selector={
                "matchExpressions": [
                    {"key": "example.com/tier", "operator": "In", "values": ["a", "b"]},
                    {"key": "canary", "operator": "DoesNotExist"},
                ]
            }
        ),
    ),
    ("contract with consumption, no RegisterUsage key", lambda s: _contract(s)),
    ("contract, perpetual, features and an issuer key", lambda s: _perpetual_contract(s)),
    (
        "onFailure HoldNewPods after 24 hours (Enforce)",
        lambda s: (
            s.update(entitlement={"mode": "Enforce"})
            or s["metering"].update(onFailure={"action": "HoldNewPods", "afterHours": 24})
        ),
    ),
    (
        "onFailure Report in audit mode",
        lambda s: (
            s.update(entitlement={"mode": "Audit"})
            or s["metering"].update(onFailure={"action": "Report", "afterHours": 1})
        ),
    ),
    (
        "five tags, decimal rounding",
        lambda s: s["metering"]["dimensions"][0].update(
            rounding="Decimal",
            allocations={"tags": [{"key": f"k{i}", "fromLabel": f"example.com/l{i}"} for i in range(5)]},
        ),
    ),
]


@pytest.mark.parametrize("edit", [c[1] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_variants_are_accepted(
    custom: client.CustomObjectsApi, crd_namespace: str, edit: Callable[[dict[str, Any]], Any]
) -> None:
    obj = sample()
    edit(obj["spec"])
    MeteredProduct.from_kube(copy.deepcopy(obj))
    created = create(custom, crd_namespace, obj)
    assert created["metadata"]["uid"]


def test_status_subresource_and_printer_columns(
    custom: client.CustomObjectsApi, crd_namespace: str, cluster: ClusterInfo
) -> None:
    obj = sample()
    name = obj["metadata"]["name"]
    created = create(custom, crd_namespace, obj)
    assert "status" not in created
    status = MeteredProductStatus.model_validate(status_wire())
    patched = custom.patch_namespaced_custom_object_status(
        product.GROUP,
        product.VERSION,
        crd_namespace,
        product.PLURAL,
        name,
        {"status": status.to_kube()},
    )
    # Exactly what the operator wrote comes back: exact decimals, UTC times, nothing defaulted.
    assert patched["status"] == status.to_kube()
    assert MeteredProductStatus.model_validate(patched["status"]) == status
    # The main resource ignores status: a spec update cannot clobber it.
    obj_update = copy.deepcopy(patched)
    obj_update["status"] = {"pods": {"registered": 99}}
    obj_update["spec"]["metering"]["dryRun"] = True
    replaced = custom.replace_namespaced_custom_object(
        product.GROUP, product.VERSION, crd_namespace, product.PLURAL, name, obj_update
    )
    assert replaced["status"]["pods"]["registered"] == 3
    assert replaced["metadata"]["generation"] == 2

    table = kubectl(cluster, "get", "mprod", name, "-n", crd_namespace)
    header, row = table.splitlines()[:2]
    for column in ("NAME", "PRODUCT", "MODE", "ENTITLED", "DENIED", "LAST METERED HOUR", "READY", "AGE"):
        assert column in header, header
    assert row.split()[:7] == [
        name,
        "1fszvu527waovqeuhpkyx2b5d",
        "Enforce",
        "3",
        str(status.pods.denied),
        "2026-11-26T03:00:00Z",
        "True",
    ]


def test_kubectl_explain_shows_the_model_descriptions(
    crd_installed: dict[str, Any], cluster: ClusterInfo
) -> None:
    deadline = time.monotonic() + EXPLAIN_TIMEOUT
    while True:
        result = subprocess.run(
            [
                str(cluster.bin_dir / "kubectl"),
                "--kubeconfig",
                str(cluster.kubeconfig),
                "explain",
                "meteredproduct.spec.metering.dimensions",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # explain wraps lines
    dimension = product.Dimension.model_fields
    assert "The listing's custom dimensions to meter" in text
    for field in ("name", "source", "aggregation", "rounding", "allocations"):
        description = dimension[field].description
        assert description is not None
        assert description[:40] in text, f"{field}: {description[:40]!r} not in explain output"
    assert "Average" in text
    assert "MemoryRequestsGiB" in text


# --- refused -----------------------------------------------------------------------------------------


def _dim(spec: dict[str, Any]) -> dict[str, Any]:
    first: dict[str, Any] = spec["metering"]["dimensions"][0]
    return first


def _tags(spec: dict[str, Any]) -> list[dict[str, Any]]:
    tags: list[dict[str, Any]] = _dim(spec)["allocations"]["tags"]
    return tags


# (case id, edit of the sample spec, field path the API server's message must name)
def _on_failure(spec: dict[str, Any], mode: str = "Enforce", **on_failure: Any) -> dict[str, Any]:
    spec.update(entitlement={"mode": mode})
    spec["metering"]["onFailure"] = on_failure
    return spec


# spec.metering.onFailure: each refused with a message that says what is allowed.
ON_FAILURE_INVALID: list[tuple[str, Callable[[dict[str, Any]], Any], str, str]] = [
    (
        "onFailure afterHours 0",
        lambda s: _on_failure(s, afterHours=0),
        "spec.metering.onFailure.afterHours",
        "onFailure.afterHours must be a whole number of hours from 1 to 24",
    ),
    (
        "onFailure afterHours 25",
        lambda s: _on_failure(s, afterHours=25),
        "spec.metering.onFailure.afterHours",
        "onFailure.afterHours must be a whole number of hours from 1 to 24",
    ),
    (
        "onFailure afterHours as text",
        lambda s: _on_failure(s, afterHours="3"),
        "spec.metering.onFailure.afterHours",
        "must be of type integer",
    ),
    (
        "onFailure unknown action",
        lambda s: _on_failure(s, action="Shutdown"),
        "spec.metering.onFailure.action",
        'supported values: "Report", "HoldNewPods", "Evict"',
    ),
    (
        "onFailure HoldNewPods in audit mode",
        lambda s: _on_failure(s, mode="Audit", action="HoldNewPods"),
        "spec.metering.onFailure.action",
        "HoldNewPods and Evict need entitlement.mode Enforce",
    ),
    (
        "onFailure Evict with entitlement off",
        lambda s: (_on_failure(s, mode="Off", action="Evict"), s.pop("publicKey", None)),
        "spec.metering.onFailure.action",
        "HoldNewPods and Evict need entitlement.mode Enforce",
    ),
]

INVALID: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    ("bad product code", lambda s: s.update(productCode="bad code!"), "spec.productCode"),
    ("empty product code", lambda s: s.update(productCode=""), "spec.productCode"),
    ("product code too long", lambda s: s.update(productCode="a" * 256), "spec.productCode"),
    ("missing product code", lambda s: s.pop("productCode"), "spec.productCode"),
    ("public key version 0", lambda s: s.update(publicKeyVersion=0), "spec.publicKeyVersion"),
    ("public key version as text", lambda s: s.update(publicKeyVersion="one"), "spec.publicKeyVersion"),
    ("unknown source", lambda s: _dim(s).update(source="Bananas"), "spec.metering.dimensions[0].source"),
    ("bad rounding", lambda s: _dim(s).update(rounding="Sideways"), "spec.metering.dimensions[0].rounding"),
    (
        "bad aggregation",
        lambda s: _dim(s).update(aggregation="Median"),
        "spec.metering.dimensions[0].aggregation",
    ),
    (
        "six allocation tags",
        lambda s: _tags(s).extend({"key": f"k{i}", "fromLabel": f"l{i}"} for i in range(4)),
        "spec.metering.dimensions[0].allocations.tags",
    ),
    (
        "duplicate dimension names",
        lambda s: s["metering"]["dimensions"].append({"name": "replicas", "source": "Replicas"}),
        "spec.metering.dimensions[2]",
    ),
    (
        "duplicate tag keys",
        lambda s: _tags(s).append({"key": "team", "from": "Namespace"}),
        "spec.metering.dimensions[0].allocations.tags[2]",
    ),
    ("bad dimension name", lambda s: _dim(s).update(name="has space"), "spec.metering.dimensions[0].name"),
    (
        "bad tag key",
        lambda s: _tags(s)[0].update(key="a{b}"),
        "spec.metering.dimensions[0].allocations.tags[0].key",
    ),
    (
        "tag with from and fromLabel",
        lambda s: _tags(s)[0].update(fromLabel="team"),
        "spec.metering.dimensions[0].allocations.tags[0]",
    ),
    (
        "tag without a source",
        lambda s: _tags(s)[0].pop("from"),
        "spec.metering.dimensions[0].allocations.tags[0]",
    ),
    (
        "both pem and configMapKeyRef",
        lambda s: s["publicKey"].update(pem=PEM),
        "spec.publicKey",
    ),
    ("neither pem nor configMapKeyRef", lambda s: s.update(publicKey={}), "spec.publicKey"),
    ("pem that is not PEM", lambda s: s.update(publicKey={"pem": "ssh-rsa AAAA"}), "spec.publicKey.pem"),
    ("public key missing while enforcing", lambda s: s.pop("publicKey"), "spec.publicKey"),
    (
        "entitlement off and no dimensions",
        lambda s: s.update(entitlement={"mode": "Off"}, metering={"dimensions": []}),
        "spec.entitlement.mode",
    ),
    (
        "unknown entitlement mode",
        lambda s: s["entitlement"].update(mode="Sometimes"),
        "spec.entitlement.mode",
    ),
    ("unknown entitlement scope", lambda s: s["entitlement"].update(scope="Node"), "spec.entitlement.scope"),
    ("dryRun as text", lambda s: s["metering"].update(dryRun="yes"), "spec.metering.dryRun"),
    (
        "sample interval below 5 seconds",
        lambda s: s["metering"].update(sampleIntervalSeconds=1),
        "spec.metering.sampleIntervalSeconds",
    ),
    (
        "dimensions not a list",
        lambda s: s["metering"].update(dimensions={"name": "x"}),
        "spec.metering.dimensions",
    ),
    (
        "too many dimensions",
        lambda s: s["metering"].update(
            dimensions=[{"name": f"d{i}", "source": "Replicas"} for i in range(33)]
        ),
        "spec.metering.dimensions",
    ),
    (
        "In without values",
        lambda s: s["selector"].update(matchExpressions=[{"key": "tier", "operator": "In"}]),
        "spec.selector.matchExpressions[0].values",
    ),
    ("missing selector", lambda s: s.pop("selector"), "spec.selector"),
    (
        "license manager source without licenseManager",
        lambda s: s["entitlement"].update(source="LicenseManager"),
        "spec.entitlement.licenseManager",
    ),
    (
        "licenseManager with the RegisterUsage source",
        lambda s: s["entitlement"].update(licenseManager=_license_manager()),
        "spec.entitlement.licenseManager",
    ),
    (
        "entitlement with perPod and perCluster",
        lambda s: _contract(s, entitlements=[{"name": "seats", "perPod": 1, "perCluster": 2}]),
        "spec.entitlement.licenseManager.entitlements[0]",
    ),
    (
        "feature with an amount above 1",
        lambda s: _contract(s, entitlements=[{"name": "premium", "unit": "None", "perPod": 2}]),
        "spec.entitlement.licenseManager.entitlements[0]",
    ),
    (
        "zero seats per pod",
        lambda s: _contract(s, entitlements=[{"name": "seats", "perPod": 0}]),
        "spec.entitlement.licenseManager.entitlements[0].perPod",
    ),
    (
        "duplicate license entitlements",
        lambda s: _contract(
            s, entitlements=[{"name": "seats", "perPod": 1}, {"name": "seats", "perCluster": 1}]
        ),
        "spec.entitlement.licenseManager.entitlements[1]",
    ),
    (
        "license manager product with a RegisterUsage publicKey",
        lambda s: _contract(s, keep_public_key=True),
        "spec.publicKey",
    ),
    (
        "bad key fingerprint",
        lambda s: _contract(s, keyFingerprint="aws:marketplace"),
        "spec.entitlement.licenseManager.keyFingerprint",
    ),
    (
        "unknown license unit",
        lambda s: _contract(s, entitlements=[{"name": "seats", "unit": "Seats", "perPod": 1}]),
        "spec.entitlement.licenseManager.entitlements[0].unit",
    ),
    *[(name, edit, field) for name, edit, field, _ in ON_FAILURE_INVALID],
]


@pytest.mark.parametrize(("edit", "field"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_product_is_refused_naming_the_field(
    custom: client.CustomObjectsApi,
    crd_namespace: str,
    edit: Callable[[dict[str, Any]], Any],
    field: str,
) -> None:
    obj = sample()
    edit(obj["spec"])
    with pytest.raises(ApiException) as err:
        create(custom, crd_namespace, obj)
    assert err.value.status == 422, err.value.body
    body = json.loads(err.value.body)
    message: str = body["message"]
    assert f"{field}:" in message or f"{field} " in message, message
    causes = [cause.get("field", "") for cause in body.get("details", {}).get("causes", [])]
    assert any(cause == field or cause.startswith(field) for cause in causes), causes
    # The models hold the same rules, so the operator can never act on what the API server refuses.
    with pytest.raises(ValidationError):
        MeteredProduct.from_kube(obj)


def test_the_invalid_table_is_big_enough() -> None:
    assert len(INVALID) >= 15
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize(
    ("edit", "text"), [(c[1], c[3]) for c in ON_FAILURE_INVALID], ids=[c[0] for c in ON_FAILURE_INVALID]
)
def test_on_failure_mistakes_are_refused_with_a_specific_message(
    custom: client.CustomObjectsApi, crd_namespace: str, edit: Callable[[dict[str, Any]], Any], text: str
) -> None:
    obj = sample()
    edit(obj["spec"])
    with pytest.raises(ApiException) as err:
        create(custom, crd_namespace, obj)
    assert text in json.loads(err.value.body)["message"], err.value.body
