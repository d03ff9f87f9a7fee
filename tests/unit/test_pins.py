"""Seller pins (domain/pins.py) and spec transitions (domain/transitions.py): pure, no cluster."""

from __future__ import annotations

import argparse
import json
from functools import cache
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from metering_operator.commands import run
from metering_operator.domain import onfailure, transitions
from metering_operator.domain.pins import Pin, Pins, effective, resolve
from metering_operator.domain.product import (
    PRODUCT_CODE_IMMUTABLE,
    EntitlementMode,
    EntitlementScope,
    FailureAction,
    MeteredProduct,
    MeteredProductSpec,
)
from metering_operator.domain.readiness import ready_condition
from metering_operator.metering.plan import metering_owners

CODE = "pinnedproduct0001"
REPLICAS = {"name": "replicas", "source": "Replicas", "aggregation": "Average", "rounding": "Up"}
VCPU = {"name": "vcpu", "source": "CPURequests", "aggregation": "Maximum", "rounding": "Decimal"}


@cache
def pem(n: int = 0) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def pin(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "productCode": CODE,
        "namespace": "shop",
        "name": "db",
        "minMode": "Enforce",
        "scope": "Pod",
        "dimensions": [REPLICAS, VCPU],
        "publicKey": pem(),
        "publicKeyVersion": 2,
    }
    base.update(overrides)
    return base


def pins(*items: dict[str, Any]) -> Pins:
    return Pins.parse(list(items) or [pin()])


def spec(**overrides: Any) -> MeteredProductSpec:
    base: dict[str, Any] = {
        "productCode": CODE,
        "publicKeyVersion": 2,
        "publicKey": {"pem": pem()},
        "selector": {"matchLabels": {"app": "db"}},
        "entitlement": {"mode": "Enforce", "scope": "Pod"},
        "metering": {"dimensions": [REPLICAS, VCPU]},
    }
    for key, value in overrides.items():
        if key in ("entitlement", "metering"):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return MeteredProductSpec.model_validate(base)


# --- parsing -----------------------------------------------------------------------------------------


def test_a_complete_pin_parses_with_camel_case_keys() -> None:
    parsed = pins().pins[0]
    assert (parsed.key, parsed.min_mode, parsed.scope) == (
        "shop/db",
        EntitlementMode.ENFORCE,
        EntitlementScope.POD,
    )
    assert [d.name for d in parsed.dimensions] == ["replicas", "vcpu"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"minMode": "Strict"}, "Input should be 'Enforce', 'Audit' or 'Off'"),
        ({"scope": "Node"}, "Input should be 'Pod' or 'Cluster'"),
        ({"productCode": "has space"}, "should match pattern"),
        ({"namespace": "Shop"}, "should match pattern"),
        ({"publicKey": None, "publicKeyVersion": None}, "minMode Enforce needs publicKey"),
        ({"publicKeyVersion": None}, "publicKey and publicKeyVersion are pinned together"),
        ({"publicKey": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"}, "not a valid PEM"),
        ({"dimensions": [REPLICAS, REPLICAS]}, "duplicate dimension names: replicas"),
        ({"dimensions": [{"name": "x", "source": "Nodes"}]}, "Input should be 'Replicas'"),
        ({"dimensionz": []}, "Extra inputs are not permitted"),
    ],
)
def test_malformed_pins_are_refused_naming_the_problem(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        pins(pin(**change))


def test_an_ec_key_is_refused_as_not_rsa() -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(ValidationError, match="must be RSA"):
        pins(pin(publicKey=ec_pem))


def test_two_pins_for_one_code_or_one_product_are_refused() -> None:
    with pytest.raises(ValidationError, match=f"more than one pin for product code {CODE}"):
        pins(pin(), pin(name="other"))
    with pytest.raises(ValidationError, match="more than one pin for MeteredProduct shop/db"):
        pins(pin(), pin(productCode="othercode"))


def test_minimum_off_needs_no_key() -> None:
    parsed = pins(pin(minMode="Off", publicKey=None, publicKeyVersion=None)).pins[0]
    assert parsed.public_key is None


# --- the CLI -----------------------------------------------------------------------------------------


def parse_run(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run.configure_parser(parser)
    return parser.parse_args(["--region", "eu-north-7", *argv])


def test_pin_flags_and_a_pins_file_are_merged(tmp_path: Any) -> None:
    path = tmp_path / "pins.yaml"
    path.write_text(json.dumps({"pins": [pin(productCode="second", name="db2")]}))
    settings = run.build_settings(parse_run("--pin", json.dumps(pin()), "--pins-file", str(path)))
    assert [p.product_code for p in settings.pins.pins] == [CODE, "second"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pin", "{not json"], "--pin #1 is not a JSON object"),
        (["--pin", json.dumps(pin(minMode="Never"))], "pin #1.minMode: Input should be"),
        (["--pin", json.dumps(pin()), "-n", "elsewhere"], "in a namespace the operator does not watch"),
        (
            ["--pin", json.dumps(pin()), "--trusted-product-code", "another"],
            f"pinned product code {CODE} is not among the trusted product codes",
        ),
        (["--pins-file", "/nonexistent/pins.yaml"], "--pins-file /nonexistent/pins.yaml"),
    ],
)
def test_bad_pin_flags_are_a_clear_error_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError, match=message):
        run.build_settings(parse_run(*argv))
    assert run.main(parse_run(*argv)) == 2
    assert message.split(":")[0] in capsys.readouterr().err


# --- resolution --------------------------------------------------------------------------------------


def test_a_pinned_product_switched_to_license_manager_stays_a_register_usage_product() -> None:
    """A buyer's edit to source LicenseManager drops the RegisterUsage key: the pin's key and
    source are what the gate acts on, and the edit is reported."""
    contract = {
        "source": "LicenseManager",
        "licenseManager": {"productSKU": "prod-x", "entitlements": [{"name": "seats", "perPod": 1}]},
    }
    resolution = resolve(pins(), "shop", "db", spec(publicKey=None, entitlement=contract))
    assert [v.field for v in resolution.violations] == ["spec.entitlement.source"]
    assert "pinned RegisterUsage" in resolution.violations[0].message
    assert resolution.spec.entitlement.source.value == "RegisterUsage"
    assert resolution.spec.entitlement.license_manager is None
    assert resolution.spec.public_key is not None


def test_without_pins_the_spec_is_obeyed_as_written() -> None:
    weak = spec(entitlement={"mode": "Audit", "scope": "Cluster"}, metering={"dryRun": True})
    resolution = resolve(Pins(), "shop", "db", weak)
    assert resolution.spec is weak
    assert (resolution.violations, resolution.refusal, resolution.ready()) == ((), None, None)


def test_an_unpinned_selector_is_the_products_own() -> None:
    narrowed = spec(selector={"matchLabels": {"app": "none"}})
    resolution = resolve(pins(), "shop", "db", narrowed)
    assert resolution.violations == ()
    assert resolution.spec.selector == narrowed.selector


def test_a_product_that_meets_its_pin_has_no_violation() -> None:
    resolution = resolve(pins(), "shop", "db", spec())
    assert resolution.violations == ()
    assert resolution.ready() is None
    assert resolution.spec == spec()


@pytest.mark.parametrize(
    ("weaker", "field", "message"),
    [
        (
            {"entitlement": {"mode": "Audit"}},
            "spec.entitlement.mode",
            "spec.entitlement.mode is Audit, pinned minimum Enforce",
        ),
        (
            {"entitlement": {"mode": "Off"}, "publicKey": None},
            "spec.entitlement.mode",
            "spec.entitlement.mode is Off, pinned minimum Enforce",
        ),
        (
            {"entitlement": {"scope": "Cluster"}},
            "spec.entitlement.scope",
            "spec.entitlement.scope is Cluster, pinned Pod",
        ),
        ({"metering": {"dryRun": True}}, "spec.metering.dryRun", "spec.metering.dryRun is true"),
        (
            {"metering": {"dimensions": [REPLICAS]}},
            "spec.metering.dimensions",
            "lacks pinned dimension(s) vcpu",
        ),
        (
            {"metering": {"dimensions": []}},
            "spec.metering.dimensions",
            "lacks pinned dimension(s) replicas, vcpu",
        ),
        (
            {"metering": {"dimensions": [{**REPLICAS, "rounding": "Down"}, VCPU]}},
            "spec.metering.dimensions",
            "replicas is Replicas/Average/Down, pinned Replicas/Average/Up",
        ),
        ({"publicKeyVersion": 1}, "spec.publicKeyVersion", "spec.publicKeyVersion is 1, pinned 2"),
        ({"publicKey": {"pem": pem(1)}}, "spec.publicKey", "not the pinned public key"),
        ({"productCode": "decoycode"}, "spec.productCode", f"spec.productCode is decoycode, pinned {CODE}"),
        (
            {"selector": {"matchLabels": {"app": "none"}}},
            "spec.selector",
            "spec.selector is app=none, pinned app=db",
        ),
        ({"selector": {}}, "spec.selector", "spec.selector is (every pod), pinned app=db"),
    ],
)
def test_each_weaker_field_is_not_obeyed_and_is_named(
    weaker: dict[str, Any], field: str, message: str
) -> None:
    resolution = resolve(pins(pin(selector={"matchLabels": {"app": "db"}})), "shop", "db", spec(**weaker))
    assert [v.field for v in resolution.violations] == [field]
    assert message in resolution.violations[0].message
    # The pin wins: whatever was weakened, the effective spec is exactly the pinned product.
    assert resolution.spec == spec()
    ready = resolution.ready()
    assert ready is not None
    assert (ready.type, ready.status, ready.reason) == ("Ready", "False", "PinViolated")
    assert message in ready.message
    assert ready_condition(pinned=ready, trusted=True) == ready


def test_everything_weakened_at_once_is_every_field_reported() -> None:
    weak = spec(
        entitlement={"mode": "Audit", "scope": "Cluster"},
        metering={"dimensions": [], "dryRun": True},
        publicKeyVersion=1,
    )
    resolution = resolve(pins(), "shop", "db", weak)
    assert {v.field for v in resolution.violations} == {
        "spec.entitlement.mode",
        "spec.entitlement.scope",
        "spec.metering.dimensions",
        "spec.metering.dryRun",
        "spec.publicKeyVersion",
    }
    assert resolution.spec == spec()


def test_stronger_than_the_pin_is_obeyed_and_extra_dimensions_are_kept() -> None:
    extra = {"name": "memory", "source": "MemoryRequestsGiB"}
    relaxed = pins(pin(minMode="Audit", dimensions=[REPLICAS]))
    resolution = resolve(relaxed, "shop", "db", spec(metering={"dimensions": [REPLICAS, VCPU, extra]}))
    assert resolution.violations == ()
    assert resolution.spec.entitlement.mode is EntitlementMode.ENFORCE
    assert [d.name for d in resolution.spec.metering.dimensions] == ["replicas", "vcpu", "memory"]


def test_a_key_from_a_config_map_is_replaced_by_the_pinned_key_without_a_violation() -> None:
    from_cm = spec(publicKey={"configMapKeyRef": {"name": "keys", "key": "pem"}})
    resolution = resolve(pins(), "shop", "db", from_cm)
    assert resolution.violations == ()
    assert resolution.spec.public_key is not None
    assert resolution.spec.public_key.pem == pem()


def test_a_pinned_code_elsewhere_is_not_obeyed_at_all() -> None:
    resolution = resolve(pins(), "other", "decoy", spec())
    assert not resolution.obeyed
    ready = resolution.ready()
    assert ready is not None
    assert (ready.status, ready.reason) == ("False", "PinnedElsewhere")
    assert f"product code {CODE} is pinned to MeteredProduct shop/db" in ready.message
    # An unpinned code elsewhere is untouched.
    assert resolve(pins(), "other", "decoy", spec(productCode="unpinned")).obeyed


def test_effective_product_keeps_metadata_and_status() -> None:
    obj = {
        "metadata": {"name": "db", "namespace": "shop", "uid": "u1", "generation": 3},
        "spec": spec(metering={"dryRun": True, "dimensions": []}).to_kube(),
    }
    product = effective(pins(), MeteredProduct.from_kube(obj))
    assert product.metadata.uid == "u1"
    assert product.spec == spec()


def test_the_pinned_product_owns_metering_of_its_code_not_the_oldest() -> None:
    def item(ns: str, name: str, created: str, code: str = CODE) -> dict[str, Any]:
        return {
            "metadata": {"namespace": ns, "name": name, "creationTimestamp": created},
            "spec": {"productCode": code, "metering": {"dimensions": [REPLICAS]}},
        }

    decoy, real = item("other", "decoy", "2026-01-01T00:00:00Z"), item("shop", "db", "2026-06-01T00:00:00Z")
    assert metering_owners([decoy, real])[CODE] == ("other", "decoy")  # unpinned: the oldest wins
    assert metering_owners([decoy, real], pins())[CODE] == ("shop", "db")
    # Even while the pinned product is missing, the decoy does not take over.
    assert metering_owners([decoy], pins())[CODE] == ("shop", "db")


# --- transitions -------------------------------------------------------------------------------------


def test_each_protection_change_is_one_change_weakening_or_not() -> None:
    base = transitions.observe(spec())
    cases = {
        "spec.entitlement.mode": (spec(entitlement={"mode": "Audit"}), True, "Enforce", "Audit"),
        "spec.entitlement.scope": (spec(entitlement={"scope": "Cluster"}), True, "Pod", "Cluster"),
        "spec.metering.dryRun": (spec(metering={"dryRun": True}), True, "false", "true"),
        "spec.metering.dimensions": (spec(metering={"dimensions": [VCPU]}), True, "replicas,vcpu", "vcpu"),
        "spec.productCode": (spec(productCode="other"), True, CODE, "other"),
        "spec.selector": (spec(selector={"matchLabels": {"app": "none"}}), True, "app=db", "app=none"),
        "spec.metering.onFailure": (
            spec(metering={"onFailure": {"afterHours": 24}}),
            True,
            "Report after 3h",
            "Report after 24h",
        ),
    }
    for field, (changed, weakens, old, new) in cases.items():
        found = transitions.changes(base, transitions.observe(changed))
        assert [(c.field, c.weakens, c.old, c.new) for c in found] == [(field, weakens, old, new)]
        back = transitions.changes(transitions.observe(changed), base)
        assert [(c.field, c.weakens) for c in back] == [
            (field, field in ("spec.productCode", "spec.selector"))
        ]
    assert transitions.changes(base, base) == []
    assert transitions.changes(None, base) == []
    # Recorded by an operator that did not observe selectors yet: no selector change is invented.
    older = base.model_copy(update={"selector": None})
    assert transitions.changes(older, transitions.observe(spec(selector={}))) == []


def test_a_weaker_on_failure_action_or_more_hours_weakens() -> None:
    def seen(action: str, hours: int) -> Any:
        return transitions.observe(spec(metering={"onFailure": {"action": action, "afterHours": hours}}))

    hold, report, evict = seen("HoldNewPods", 2), seen("Report", 2), seen("Evict", 6)
    assert [(c.reason, c.weakens, c.message) for c in transitions.changes(hold, report)] == [
        (
            "OnFailureChanged",
            True,
            "spec.metering.onFailure changed from HoldNewPods after 2h to Report after 2h",
        )
    ]
    assert [c.weakens for c in transitions.changes(report, hold)] == [False]
    # A stronger action with more hours: one change, reported as weakening (it is, for 4 hours).
    assert [c.weakens for c in transitions.changes(hold, evict)] == [True]
    # Recorded by an operator that did not observe onFailure yet: no change is invented.
    older = hold.model_copy(update={"on_failure_action": None, "on_failure_after_hours": None})
    assert transitions.changes(older, report) == []


def test_audit_to_off_weakens_and_off_to_audit_does_not() -> None:
    audit = transitions.observe(spec(entitlement={"mode": "Audit"}))
    off = transitions.observe(spec(entitlement={"mode": "Off"}, publicKey=None))
    assert [c.weakens for c in transitions.changes(audit, off)] == [True]
    assert [c.weakens for c in transitions.changes(off, audit)] == [False]
    assert transitions.changes(audit, off)[0].message == "spec.entitlement.mode changed from Audit to Off"


@pytest.mark.parametrize(
    ("changed", "status", "reason"),
    [
        (spec(), "True", "Enforced"),
        (spec(entitlement={"mode": "Audit"}), "False", "EntitlementAudit"),
        (spec(entitlement={"mode": "Off"}, publicKey=None), "False", "EntitlementOff"),
        (spec(entitlement={"scope": "Cluster"}), "False", "ClusterScope"),
        (spec(metering={"dryRun": True}), "False", "DryRun"),
        (
            spec(entitlement={"mode": "Audit", "scope": "Cluster"}, metering={"dryRun": True}),
            "False",
            "EntitlementAudit,ClusterScope,DryRun",
        ),
    ],
)
def test_enforced_condition_names_every_weakness(
    changed: MeteredProductSpec, status: str, reason: str
) -> None:
    condition = transitions.enforced_condition(changed)
    assert (condition.type, condition.status, condition.reason) == ("Enforced", status, reason)
    assert CODE in condition.message


def test_a_product_not_obeyed_is_not_enforced() -> None:
    condition = transitions.enforced_condition(spec(), obeyed=False)
    assert (condition.status, condition.reason) == ("False", "NotObeyed")


def test_product_code_is_immutable_in_the_models_mirror_of_the_cel_rule() -> None:
    assert transitions.immutable_changes(spec(), spec(productCode="other")) == [PRODUCT_CODE_IMMUTABLE]
    assert transitions.immutable_changes(spec(), spec(entitlement={"mode": "Audit"})) == []
    assert Pin.model_validate(pin()).key == "shop/db"


# --- onFailure ---------------------------------------------------------------------------------------


def on_failure_pin(**on_failure: Any) -> Pins:
    return pins(pin(onFailure=on_failure))


def on_failure(action: str, hours: int) -> dict[str, Any]:
    return {"onFailure": {"action": action, "afterHours": hours}}


def test_an_on_failure_pin_parses_and_its_defaults_pin_nothing() -> None:
    parsed = on_failure_pin(minAction="Evict", maxAfterHours=2).pins[0].on_failure
    assert parsed is not None
    assert (parsed.min_action, parsed.max_after_hours) == (FailureAction.EVICT, 2)
    empty = on_failure_pin().pins[0].on_failure
    assert empty is not None
    assert (empty.min_action, empty.max_after_hours) == (FailureAction.REPORT, 24)
    for weakest in (on_failure("Report", 24), {}):
        resolution = resolve(on_failure_pin(), "shop", "db", spec(metering=weakest))
        assert resolution.violations == ()
        assert resolution.spec == spec(metering=weakest)


@pytest.mark.parametrize(
    ("on_failure", "message"),
    [
        ({"minAction": "Kill"}, "Input should be 'Report', 'HoldNewPods' or 'Evict'"),
        ({"maxAfterHours": 0}, "greater than or equal to 1"),
        ({"maxAfterHours": 25}, "less than or equal to 24"),
        ({"maxAfterHours": "3"}, "Input should be a valid integer"),
        ({"afterHours": 3}, "Extra inputs are not permitted"),
    ],
)
def test_malformed_on_failure_pins_are_refused_naming_the_problem(
    on_failure: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        on_failure_pin(**on_failure)


@pytest.mark.parametrize("action", ["HoldNewPods", "Evict"])
@pytest.mark.parametrize("mode", ["Audit", "Off"])
def test_a_pinned_action_that_holds_pods_needs_a_pinned_minimum_enforce(action: str, mode: str) -> None:
    keyless = {"publicKey": None, "publicKeyVersion": None} if mode == "Off" else {}
    with pytest.raises(ValidationError) as caught:
        pins(pin(minMode=mode, onFailure={"minAction": action}, **keyless))
    assert f"onFailure.minAction {action} needs minMode Enforce" in str(caught.value)
    assert f"a pinned minMode {mode} lets the buyer set entitlement.mode {mode}" in str(caught.value)
    # Report (and only a maximum afterHours) is fine with any minimum mode.
    pins(pin(minMode=mode, onFailure={"minAction": "Report", "maxAfterHours": 2}, **keyless))


def test_a_pinned_action_holding_pods_is_refused_at_startup_from_a_pin_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The operator's --pin flag (the chart's pins: values): refused before anything runs (exit 2),
    with the pin's own message."""
    argv = ["--pin", json.dumps(pin(minMode="Audit", onFailure={"minAction": "HoldNewPods"}))]
    with pytest.raises(ValueError, match=r"onFailure\.minAction HoldNewPods needs minMode Enforce"):
        run.build_settings(parse_run(*argv))
    assert run.main(parse_run(*argv)) == 2
    assert "onFailure.minAction HoldNewPods needs minMode Enforce" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("written", "field", "message", "obeyed"),
    [
        (
            on_failure("Report", 2),
            "spec.metering.onFailure.action",
            "spec.metering.onFailure.action is Report, pinned minimum HoldNewPods",
            ("HoldNewPods", 2),
        ),
        (
            on_failure("HoldNewPods", 24),
            "spec.metering.onFailure.afterHours",
            "spec.metering.onFailure.afterHours is 24, pinned maximum 2",
            ("HoldNewPods", 2),
        ),
        (
            on_failure("Report", 3),
            "spec.metering.onFailure.action,spec.metering.onFailure.afterHours",
            "spec.metering.onFailure.action is Report, pinned minimum HoldNewPods",
            ("HoldNewPods", 2),
        ),
        # No onFailure in the spec: its defaults (Report after 3 hours) are weaker than the pin.
        (
            {},
            "spec.metering.onFailure.action,spec.metering.onFailure.afterHours",
            "spec.metering.onFailure.afterHours is 3, pinned maximum 2",
            ("HoldNewPods", 2),
        ),
        # Stricter than the pin, field by field: obeyed as written, no violation.
        (on_failure("Evict", 1), "", "", ("Evict", 1)),
        (on_failure("HoldNewPods", 2), "", "", ("HoldNewPods", 2)),
        # One field stricter, the other weaker: each field is the stricter of the two.
        (
            on_failure("Evict", 12),
            "spec.metering.onFailure.afterHours",
            "spec.metering.onFailure.afterHours is 12, pinned maximum 2",
            ("Evict", 2),
        ),
    ],
)
def test_the_stricter_of_pin_and_spec_on_failure_is_obeyed(
    written: dict[str, Any], field: str, message: str, obeyed: tuple[str, int]
) -> None:
    pinned = on_failure_pin(minAction="HoldNewPods", maxAfterHours=2)
    resolution = resolve(pinned, "shop", "db", spec(metering=written))
    assert ",".join(v.field for v in resolution.violations) == field
    assert not field or any(message in v.message for v in resolution.violations)
    policy = resolution.spec.metering.on_failure
    assert (policy.action.value, policy.after_hours) == obeyed
    # Only onFailure is touched: the effective spec is the written one with the obeyed policy.
    action, hours = obeyed
    assert resolution.spec == spec(metering=on_failure(action, hours))
    ready = resolution.ready()
    if field:
        assert ready is not None
        assert (ready.reason, ready.status) == ("PinViolated", "False")
        assert message in ready.message
    else:
        assert ready is None


def test_a_pinned_action_turns_a_weakened_audit_spec_back_into_a_valid_enforce_spec() -> None:
    """Audit with Report is a valid spec; the pin makes it Enforce with HoldNewPods, which the CRD's
    rule (HoldNewPods needs Enforce) accepts: the effective spec is validated again as a whole."""
    pinned = on_failure_pin(minAction="HoldNewPods")
    resolution = resolve(pinned, "shop", "db", spec(entitlement={"mode": "Audit"}))
    assert {v.field for v in resolution.violations} == {
        "spec.entitlement.mode",
        "spec.metering.onFailure.action",
    }
    assert resolution.spec.entitlement.mode is EntitlementMode.ENFORCE
    assert resolution.spec.metering.on_failure.action is FailureAction.HOLD_NEW_PODS
    assert resolution.spec.metering.on_failure.after_hours == 3  # not pinned: the spec's


def test_an_on_failure_pin_reaches_metering_and_the_gate_through_the_effective_spec() -> None:
    """The seams (metering's effective product, the gate's hold) see the pinned policy."""
    product = MeteredProduct.model_validate(
        {
            "metadata": {"name": "db", "namespace": "shop"},
            "spec": spec(metering=on_failure("Report", 24)).to_kube(),
        }
    )
    obeyed = effective(on_failure_pin(minAction="Evict", maxAfterHours=1), product)
    policy = obeyed.spec.metering.on_failure
    assert (policy.action, policy.after_hours) == (FailureAction.EVICT, 1)
    healthy = {"status": "False", "reason": onfailure.NOT_REPORTED}
    hold = onfailure.hold_for(policy, obeyed.spec.entitlement.mode, "shop/db", healthy)
    assert hold is not None
    assert hold.evict
    assert onfailure.hold_for(product.spec.metering.on_failure, EntitlementMode.ENFORCE, "x", healthy) is None
