"""A seller pin on ``spec.metering.onFailure``, tried as the buyer.

The buyer (a namespace user bound to ``edit`` plus MeteredProduct write, with its own
ServiceAccount token: ``test_pins.edit_user``) edits the pinned product's onFailure down to
``Report`` after 24 hours. The API server accepts the edit (it is a valid spec); the operator obeys
the pin instead -- HoldNewPods after 1 hour -- and reports the edit as a pin violation. Then
MeterUsage fails for one hour (the operator's key loses ``aws-marketplace:MeterUsage`` in the
emulator, as in test_metering_onfailure.py) and the *pinned* policy acts: ``MeteringHealthy`` names
HoldNewPods after 1 hour, and a new pod of the product is held behind the gate, unregistered.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from metering_operator.domain.product import ANNOTATION_ENTITLEMENT
from tests.e2e.conftest import BUYER_ROLE, PRODUCT_CODE, OperatorFactory, wait_for
from tests.e2e.test_entitlement import bare_pod, gated, notes, service_account
from tests.e2e.test_metering import H0, World
from tests.e2e.test_metering_onfailure import (
    APP,
    emulator,  # noqa: F401 -- the fixture: a product metered on "pods", the operator's own key
    events,
    fail_hour,
    permit_meter_usage,
    pod,
    start,
    wait_condition,
    wait_event,
    wait_released,
    world,  # noqa: F401 -- the fixture
)
from tests.e2e.test_pins import Products, edit_user, metric, wait_metric

pytestmark = pytest.mark.cluster

PINNED = {"minAction": "HoldNewPods", "maxAfterHours": 1}


def test_a_buyer_edit_of_a_pinned_on_failure_to_report_is_not_obeyed(
    cluster: ClusterInfo,
    kube: client.ApiClient,
    world: World,  # noqa: F811
    operator: OperatorFactory,
    tmp_path: Path,
) -> None:
    shop = world.namespace
    key = world.emulator.admin.public_key_pem(PRODUCT_CODE, 1)
    buyer = Products(edit_user(cluster, kube, shop, [shop], tmp_path / "buyer.kubeconfig"))
    admin = Products(kube)
    service_account(kube, shop, "buyer-irsa", BUYER_ROLE)  # the pods' IRSA role
    world.set_clock(H0 + timedelta(minutes=5))

    # The product as the seller ships it: it meets its pin.
    buyer.create(
        shop,
        "db",
        {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "publicKey": {"pem": key},
            "selector": {"matchLabels": {"app": APP}},
            "entitlement": {"mode": "Enforce"},
            "metering": {
                "dimensions": [{"name": "pods", "source": "ReadyPods", "aggregation": "Maximum"}],
                "onFailure": {"action": "HoldNewPods", "afterHours": 1},
            },
        },
    )
    pin = {
        "productCode": PRODUCT_CODE,
        "namespace": shop,
        "name": "db",
        "publicKey": key,
        "publicKeyVersion": 1,
        "onFailure": PINNED,
    }
    op = start(operator, world, "--pin", json.dumps(pin))
    admin.wait_condition(shop, "db", "Ready", "Configured")
    healthy = wait_condition(world, "MeteringHealthy", "True", "Reporting")
    assert "onFailure HoldNewPods after 1 hour(s)" in healthy["message"]
    wait_condition(world, "MeteringPermitted", "True", "Permitted")

    # The buyer weakens onFailure: the API server takes the edit, the operator does not obey it.
    buyer.patch(shop, "db", {"metering": {"onFailure": {"action": "Report", "afterHours": 24}}})
    assert admin.get(shop, "db")["spec"]["metering"]["onFailure"] == {"action": "Report", "afterHours": 24}
    ready = admin.wait_condition(
        shop,
        "db",
        "Ready",
        "PinViolated",
        "spec.metering.onFailure.action is Report, pinned minimum HoldNewPods",
    )
    assert ready["status"] == "False"
    assert "spec.metering.onFailure.afterHours is 24, pinned maximum 1" in ready["message"]
    violated = wait_event(world, "PinViolated", "MeteredProduct")
    assert "spec.metering.onFailure.action is Report, pinned minimum HoldNewPods" in violated.message
    for field in ("spec.metering.onFailure.action", "spec.metering.onFailure.afterHours"):
        wait_metric(op, "marketplace_metering_pin_violations", 1.0, namespace=shop, product="db", field=field)
    # The policy the operator states is still the pinned one, not the buyer's.
    stated = world.condition("MeteringHealthy")
    assert stated is not None
    assert "onFailure HoldNewPods after 1 hour(s)" in stated["message"]

    # One hour cannot be reported: the pinned policy acts after 1 hour (the spec says Report after 24).
    permit_meter_usage(world, False)
    fail_hour(world, H0)
    unhealthy = wait_condition(world, "MeteringHealthy", "False", "UsageNotReported")
    assert "1 hour(s) in a row" in unhealthy["message"]
    assert "onFailure HoldNewPods after 1 hour(s)" in unhealthy["message"]
    assert "HoldNewPods" in wait_event(world, "NewPodsHeld", "MeteredProduct").message
    registrations_before = len(world.emulator.admin.registrations(PRODUCT_CODE))
    held_name = str(bare_pod(kube, shop, app=APP, sa="buyer-irsa")["metadata"]["name"])
    held_event = wait_for(
        "a PodHeld Event on the new pod",
        lambda: next(
            (e for e in events(world, "PodHeld", "Pod") if e.involved_object.name == held_name), None
        ),
    )
    assert "MeteringFailing" in held_event.message
    held = wait_for(
        "the new pod marked held",
        lambda: (p := pod(world, held_name)) and notes(p).get(ANNOTATION_ENTITLEMENT) == "Pending" and p,
    )
    assert gated(held)
    assert len(world.emulator.admin.registrations(PRODUCT_CODE)) == registrations_before  # not registered
    assert metric(op, "marketplace_metering_pin_violations", namespace=shop, product="db") == 1.0

    # Reporting works again: the held pod is registered and released, as with an unpinned policy.
    permit_meter_usage(world, True)
    world.set_clock(H0 + timedelta(hours=2))
    wait_condition(world, "MeteringHealthy", "True", "Reporting")
    wait_released(world, held_name)
