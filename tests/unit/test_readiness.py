"""The Ready rule (domain/readiness.py): configuration faults only, metering included."""

from __future__ import annotations

from typing import Any

import pytest

from metering_operator.domain.readiness import REJECTING_METERING_REASONS, metering_rejects, ready_condition


def metering(status: str, reason: str, message: str = "details") -> dict[str, Any]:
    return {"type": "Metering", "status": status, "reason": reason, "message": message}


REJECTED = metering(
    "False", "DimensionRejected", "MeterUsage refused dimension(s) vcpu: InvalidUsageDimension"
)


def test_healthy_entitlement_only_product_is_ready() -> None:
    ready = ready_condition(trusted=True, product_code="abc", key_error=None)
    assert (ready.type, ready.status, ready.reason) == ("Ready", "True", "Configured")
    assert "dimension" not in ready.message


def test_spec_faults_come_first_in_order() -> None:
    assert (
        ready_condition(spec_error="bad", trusted=False, meters=True, metering=REJECTED).reason
        == "InvalidSpec"
    )
    untrusted = ready_condition(trusted=False, product_code="abc", key_error="bad pem", metering=REJECTED)
    assert (untrusted.status, untrusted.reason) == ("False", "UntrustedProductCode")
    assert "'abc'" in untrusted.message
    no_key = ready_condition(key_error="ConfigMap ns/key has no key 'pem'", meters=True, metering=REJECTED)
    assert (no_key.status, no_key.reason, no_key.message) == (
        "False",
        "PublicKeyUnavailable",
        "ConfigMap ns/key has no key 'pem'",
    )


@pytest.mark.parametrize("reason", sorted(REJECTING_METERING_REASONS))
def test_a_rejecting_metering_condition_makes_a_metered_product_not_ready(reason: str) -> None:
    ready = ready_condition(meters=True, metering=metering("False", reason, f"{reason} happened"))
    assert (ready.status, ready.reason, ready.message) == ("False", reason, f"{reason} happened")


def test_metering_only_product_with_entitlement_off_is_judged_on_metering() -> None:
    # entitlement Off: no key needed (key_error None), so metering alone decides
    assert ready_condition(meters=True, metering=REJECTED).status == "False"
    healthy = ready_condition(meters=True, metering=metering("True", "Reporting", "through 10:00"))
    assert (healthy.status, healthy.reason) == ("True", "Configured")
    assert "10:00" not in healthy.message  # the hourly message must not rewrite Ready every hour


@pytest.mark.parametrize(
    "condition",
    [
        None,
        metering("False", "SendFailing"),  # transient: retried inside the window, config is fine
        metering("True", "Sampling"),
        metering("True", "DryRun"),
        metering("Unknown", "DimensionRejected"),
    ],
)
def test_transient_or_healthy_metering_keeps_ready_true(condition: dict[str, Any] | None) -> None:
    assert ready_condition(meters=True, metering=condition).status == "True"


def test_a_leftover_metering_condition_is_ignored_once_the_product_stops_metering() -> None:
    assert ready_condition(meters=False, metering=REJECTED).status == "True"


def test_metering_rejects() -> None:
    assert metering_rejects(REJECTED)
    assert not metering_rejects(metering("False", "SendFailing"))
    assert not metering_rejects(metering("True", "DimensionRejected"))
    assert not metering_rejects({})


def test_all_pods_denied_is_not_ready() -> None:
    ready = ready_condition(denied_pods=3)
    assert (ready.status, ready.reason) == ("False", "AllPodsDenied")
    assert "denied all 3 pod(s)" in ready.message
    # One pod registered or still pending: the product runs for this buyer, Ready stays True.
    assert ready_condition(denied_pods=3, other_pods=1).status == "True"
    assert ready_condition().status == "True"
    # Configuration faults still come first.
    assert ready_condition(key_error="no key", denied_pods=3).reason == "PublicKeyUnavailable"
