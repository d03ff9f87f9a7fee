"""Seller pins in the chart: `pins:` values become the operator's --pin flags, and
values.schema.json refuses malformed pins before anything is installed (real Helm CLI)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.cli import build_parser
from metering_operator.commands.run import build_settings
from metering_operator.domain.product import EntitlementMode, EntitlementScope, FailureAction
from tests.chart.helmcli import Helm, one

FULLNAME = "mmo-marketplace-metering-operator"
KEY = (
    rsa.generate_private_key(public_exponent=65537, key_size=2048)
    .public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def pin(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "productCode": "abcd1234example",
        "namespace": "shop",
        "name": "db",
        "minMode": "Enforce",
        "scope": "Pod",
        "dimensions": [{"name": "nodes", "source": "Replicas", "aggregation": "Average", "rounding": "Up"}],
        "publicKey": KEY,
        "publicKeyVersion": 3,
        "selector": {"matchLabels": {"app": "db"}},
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def args_of(objects: list[dict[str, Any]]) -> list[str]:
    deployment = one(objects, "Deployment", FULLNAME)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return list(container["args"])


def test_pins_render_into_flags_the_operator_parses_back(helm: Helm) -> None:
    metering_only = pin(
        productCode="meteronly01",
        name="batch",
        minMode="Off",
        publicKey=None,
        publicKeyVersion=None,
    )
    objects = helm.render(
        values={
            "watchNamespaces": ["shop"],
            "region": "us-east-1",
            "pins": [pin(onFailure={"minAction": "HoldNewPods", "maxAfterHours": 2}), metering_only],
        }
    )
    args = args_of(objects)
    assert sum(a.startswith("--pin=") for a in args) == 2
    settings = build_settings(build_parser().parse_args(args))
    first, second = settings.pins.pins
    assert (first.product_code, first.key, first.min_mode, first.scope) == (
        "abcd1234example",
        "shop/db",
        EntitlementMode.ENFORCE,
        EntitlementScope.POD,
    )
    assert first.public_key == KEY  # the PEM's newlines survive YAML, JSON and the flag
    assert (first.public_key_version, [d.name for d in first.dimensions]) == (3, ["nodes"])
    assert first.selector is not None
    assert first.selector.match_labels == {"app": "db"}
    assert first.on_failure is not None
    assert (first.on_failure.min_action, first.on_failure.max_after_hours) == (FailureAction.HOLD_NEW_PODS, 2)
    assert (second.key, second.min_mode, second.public_key) == ("shop/batch", EntitlementMode.OFF, None)
    assert second.on_failure is None


def test_no_pins_no_flag(helm: Helm) -> None:
    assert not any(a.startswith("--pin") for a in args_of(helm.render()))


BAD_PINS = [
    # (the pin, a fragment the error must contain)
    (pin(productCode=None), "/pins/0"),
    (pin(namespace=None), "/pins/0"),
    (pin(productCode="bad code!"), "/pins/0/productCode"),
    (pin(minMode="Strict"), "/pins/0/minMode"),
    (pin(scope="Node"), "/pins/0/scope"),
    (pin(publicKey="not a pem"), "/pins/0/publicKey"),
    (pin(publicKeyVersion=0), "/pins/0/publicKeyVersion"),
    (pin(publicKeyVersion=None), "/pins/0"),
    (pin(publicKey=None, publicKeyVersion=None), "/pins/0"),
    (pin(dimensions=[{"name": "nodes", "source": "Nodes"}]), "/pins/0/dimensions/0/source"),
    (pin(dimensions=[{"source": "Replicas"}]), "/pins/0/dimensions/0"),
    (pin(minimumMode="Enforce"), "/pins/0"),
    (pin(selector={"matchLabels": {"app": 3}}), "/pins/0/selector/matchLabels/app"),
    (pin(selector={"matchExpressions": [{"key": "app", "operator": "Like"}]}), "/pins/0/selector"),
    (pin(onFailure={"minAction": "Kill"}), "/pins/0/onFailure/minAction"),
    (pin(onFailure={"maxAfterHours": 25}), "/pins/0/onFailure/maxAfterHours"),
    (pin(onFailure={"maxAfterHours": 0}), "/pins/0/onFailure/maxAfterHours"),
    (pin(onFailure={"afterHours": 3}), "/pins/0/onFailure"),
    # HoldNewPods and Evict act through the gate, which only Enforce uses.
    (pin(minMode="Audit", onFailure={"minAction": "HoldNewPods"}), "/pins/0/minMode"),
    (
        pin(minMode="Off", publicKey=None, publicKeyVersion=None, onFailure={"minAction": "Evict"}),
        "/pins/0/minMode",
    ),
]


@pytest.mark.parametrize(("bad", "fragment"), BAD_PINS, ids=[f"{n}" for n in range(len(BAD_PINS))])
def test_malformed_pins_are_refused_by_the_schema(helm: Helm, bad: dict[str, Any], fragment: str) -> None:
    result = helm.template(values={"pins": [bad]}, check=False)
    assert result.returncode != 0, f"{bad} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert fragment in result.stderr, result.stderr


def test_a_pin_with_minimum_off_needs_no_key(helm: Helm) -> None:
    result = helm.template(
        values={"pins": [pin(minMode="Off", publicKey=None, publicKeyVersion=None)]}, check=False
    )
    assert result.returncode == 0, result.stderr


def test_an_on_failure_pin_without_a_holding_action_needs_no_enforce(helm: Helm) -> None:
    """Report with a maximum afterHours is fine with any minMode; so is HoldNewPods with minMode left
    out (its default is Enforce)."""
    for ok in (
        pin(minMode="Audit", onFailure={"minAction": "Report", "maxAfterHours": 1}),
        pin(minMode=None, onFailure={"minAction": "Evict"}),
    ):
        result = helm.template(values={"pins": [ok]}, check=False)
        assert result.returncode == 0, result.stderr
