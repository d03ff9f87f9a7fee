"""Status-write echoes of a MeteredProduct are skipped cheaply, and nothing a handler reads is.

The fingerprints (metering_operator.domain.echoes), the spec reporter's ``settled`` and the gate's
memoized index entry, without a cluster: the reporter is given a product whose status already
says what it would write, so looking at it makes no API call. Its end-to-end twin is
tests/e2e/test_product_echoes.py.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes import client
from urllib3.exceptions import MaxRetryError

from metering_operator.domain import transitions
from metering_operator.domain.clock import ManualClock
from metering_operator.domain.echoes import Fingerprints, gate_fingerprint, report_fingerprint
from metering_operator.domain.pins import Pins, resolve
from metering_operator.domain.product import EntitlementMode, MeteredProductSpec
from metering_operator.handlers import entitlement
from metering_operator.kube.events import EventPoster
from metering_operator.pinning.presence import PinPresence
from metering_operator.pinning.reporter import SpecReporter
from metering_operator.settings import OperatorSettings
from tests.unit.test_pins import pem, pin

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SPEC: dict[str, Any] = {
    "productCode": "prod-abc123",
    "publicKeyVersion": 2,
    "publicKey": {"pem": pem()},
    "selector": {"matchLabels": {"app": "db"}},
    "entitlement": {"mode": "Enforce", "scope": "Pod"},
}


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-03-01T11:00:00Z",
        "observedGeneration": 1,
    }


def product(spec: dict[str, Any] | None = None, generation: int = 1, uid: str = "u-1") -> dict[str, Any]:
    """A product whose status says what the reporter and the gate last wrote."""
    parsed = MeteredProductSpec.model_validate(spec or SPEC)
    enforced = transitions.enforced_condition(resolve(Pins(), "shop", "db", parsed).spec)
    return {
        "apiVersion": "metering.marketplace.aws/v1alpha1",
        "kind": "MeteredProduct",
        "metadata": {"name": "db", "namespace": "shop", "uid": uid, "generation": generation},
        "spec": copy.deepcopy(spec or SPEC),
        "status": {
            "observedGeneration": generation,
            "observedSpec": transitions.observe(parsed).to_kube(),
            "pods": {"registered": 3, "pending": 0, "denied": 0},
            "conditions": [
                condition("Ready", "True", "Ready"),
                condition(enforced.type, enforced.status, enforced.reason, enforced.message),
            ],
        },
    }


def echo(body: dict[str, Any], **status: Any) -> dict[str, Any]:
    """The same product after a status write of someone's."""
    changed = copy.deepcopy(body)
    changed["status"].update(status)
    return changed


def with_condition(body: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    others = [c for c in changed["status"]["conditions"] if c["type"] != cond["type"]]
    changed["status"]["conditions"] = [*others, cond]
    return changed


def respec(body: dict[str, Any], **entitlement: str) -> dict[str, Any]:
    changed = copy.deepcopy(body)
    changed["spec"]["entitlement"].update(entitlement)
    changed["metadata"]["generation"] += 1
    return changed


# --- fingerprints ------------------------------------------------------------------------------


def test_the_gate_skips_its_own_and_the_reporters_status_but_not_spec_or_metering_verdicts() -> None:
    body = product()
    same = gate_fingerprint(body)
    assert gate_fingerprint(echo(body, pods={"registered": 4, "pending": 1, "denied": 0})) == same
    assert gate_fingerprint(echo(body, observedSpec={"productCode": "x"})) == same
    assert gate_fingerprint(with_condition(body, condition("Ready", "False", "AllPodsDenied"))) == same

    assert gate_fingerprint(respec(body, mode="Audit")) != same
    assert gate_fingerprint({**body, "metadata": {**body["metadata"], "uid": "u-2"}}) != same
    rejected = condition("Metering", "False", "DimensionRejected", "AWS refused dimension vcpu")
    assert gate_fingerprint(with_condition(body, rejected)) != same
    failing = condition("MeteringHealthy", "False", "UsageNotReported", "3 hours")
    assert gate_fingerprint(with_condition(body, failing)) != same


def test_the_reporter_reads_its_own_status_parts_and_always_looks_at_a_deletion() -> None:
    body = product()
    same = report_fingerprint(body)
    assert report_fingerprint(echo(body, pods={"registered": 9, "pending": 0, "denied": 0})) == same
    assert report_fingerprint(with_condition(body, condition("Metering", "True", "Reported"))) == same

    assert (
        report_fingerprint(echo(body, observedSpec={**body["status"]["observedSpec"], "mode": "Off"})) != same
    )
    assert (
        report_fingerprint(with_condition(body, condition("Enforced", "True", "Enforced", "forged"))) != same
    )
    assert report_fingerprint(respec(body, mode="Audit")) != same
    deleting = copy.deepcopy(body)
    deleting["metadata"]["deletionTimestamp"] = "2026-03-01T12:00:00Z"
    assert report_fingerprint(deleting) is None


def test_fingerprints_remember_per_key_and_never_settle_none() -> None:
    seen = Fingerprints()
    assert seen.changed("a", (1,))
    assert not seen.changed("a", (1,))
    assert seen.changed("b", (1,))  # another product
    assert seen.changed("a", (2,))
    assert not seen.changed("a", (2,))
    assert seen.changed("a", None)
    assert seen.changed("a", None)
    seen.remember("a", (3,))
    seen.forget("a")
    assert not seen.seen("a", (3,))
    # The body may change under a fingerprint taken from it: the fingerprint is a copy.
    body = product()
    fp = gate_fingerprint(body)
    body["status"]["conditions"].append(condition("Metering", "False", "DuplicateProductCode"))
    assert gate_fingerprint(body) != fp


# --- the spec reporter -------------------------------------------------------------------------


def reporter(pins: Pins | None = None) -> SpecReporter:
    # No API server behind it: a test that reaches a write fails on the connection.
    config = client.Configuration(host="http://127.0.0.1:9")
    config.retries = 0
    api = client.ApiClient(config)
    events = EventPoster(api)
    return SpecReporter(
        api, events, pins or Pins(), PinPresence(api, events, pins or Pins()), ManualClock(NOW)
    )


def test_a_status_echo_is_settled_and_a_spec_change_after_it_is_not() -> None:
    rep = reporter()
    body = product()
    assert not rep.settled("ADDED", body)  # never looked at
    rep.observe("ADDED", body)  # its status already says it all: no write, remembered
    assert rep.settled("MODIFIED", echo(body, pods={"registered": 4, "pending": 0, "denied": 0}))
    assert rep.settled("MODIFIED", with_condition(body, condition("Ready", "False", "AllPodsDenied")))

    assert not rep.settled("MODIFIED", respec(body, mode="Audit"))
    assert not rep.settled(
        "MODIFIED", echo(body, observedSpec={**body["status"]["observedSpec"], "mode": "Off"})
    )
    assert not rep.settled("DELETED", body)


def test_a_status_someone_else_changed_is_looked_at_until_restored() -> None:
    rep = reporter()
    body = product()
    rep.observe("ADDED", body)
    tampered = echo(body, observedSpec={**body["status"]["observedSpec"], "mode": "Off"})
    assert not rep.settled("MODIFIED", tampered)
    # The restoring write is attempted (and fails here: no server), so nothing is remembered
    # for the tampered status: the next event showing it is looked at again, and retried.
    with pytest.raises(MaxRetryError):
        rep.observe("MODIFIED", tampered)
    assert not rep.settled("MODIFIED", tampered)
    assert rep.settled("MODIFIED", body)  # restored: as it should be


def test_a_missing_pinned_product_is_never_settled() -> None:
    pinned = Pins.parse([pin(productCode=SPEC["productCode"], dimensions=[])])
    rep = reporter(pinned)
    body = product()
    rep.observe("ADDED", body)
    assert rep.settled("MODIFIED", body)
    (the_pin,) = pinned.pins
    # E.g. a periodic check's 404 racing the product's creation (its Warning Event fails here).
    with pytest.raises(MaxRetryError):
        rep.presence.report(the_pin, missing=True, why="does not exist")
    assert not rep.settled("MODIFIED", body)


# --- the gate's index entry --------------------------------------------------------------------


def index(body: dict[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    meta = body["metadata"]
    return entitlement.gate_entry(meta["namespace"], meta["name"], body["spec"], meta, settings)


def test_the_index_entry_is_kept_while_the_spec_is_and_redone_on_a_spec_change() -> None:
    settings = OperatorSettings(region="eu-west-1")
    body = product(uid="u-index")
    first = index(body, settings)
    again = index(echo(body, pods={"registered": 1, "pending": 0, "denied": 0}), settings)
    assert again == first
    assert again["shop"][3] is first["shop"][3]  # not parsed again: the same selector object
    assert first["shop"][1] is EntitlementMode.ENFORCE

    changed = index(respec(body, mode="Audit"), settings)
    assert changed["shop"][1] is EntitlementMode.AUDIT
    assert changed["shop"][3] is not first["shop"][3]
