"""The admission webhook's mutation (handlers/entitlement.gate_pod) on kopf's own Patch object."""

from __future__ import annotations

from typing import Any, cast

import kopf

from metering_operator.domain.product import SCHEDULING_GATE, EntitlementMode, LabelSelector
from metering_operator.handlers.entitlement import gate_pod

WEB = LabelSelector.model_validate({"matchLabels": {"app": "web"}})
ENFORCE, AUDIT = EntitlementMode.ENFORCE, EntitlementMode.AUDIT


def new_pod(labels: dict[str, str], gates: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    if gates is not None:
        spec["schedulingGates"] = [{"name": g} for g in gates]
    return {"metadata": {"namespace": "ns", "labels": labels}, "spec": spec}


def json_patch(body: dict[str, Any], products: list[tuple[str, EntitlementMode, bool, LabelSelector]]) -> Any:
    patch = kopf.Patch(body=kopf.Body(cast(kopf.RawBody, body)))
    chosen = gate_pod(body, patch, products)
    return chosen, patch.as_json_patch()


def test_enforce_product_adds_the_gate() -> None:
    chosen, ops = json_patch(new_pod({"app": "web"}), [("ns/p", ENFORCE, True, WEB)])
    assert chosen == "ns/p"
    assert ops == [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SCHEDULING_GATE}]}]


def test_existing_gates_are_kept() -> None:
    chosen, ops = json_patch(new_pod({"app": "web"}, ["other/gate"]), [("ns/p", ENFORCE, True, WEB)])
    assert chosen == "ns/p"
    assert len(ops) == 1
    assert ops[0]["path"].startswith("/spec/schedulingGates")
    assert ops[0]["value"] in ({"name": SCHEDULING_GATE}, [{"name": "other/gate"}, {"name": SCHEDULING_GATE}])


def test_no_patch_for_audit_untrusted_unselected_or_already_gated() -> None:
    assert json_patch(new_pod({"app": "web"}), [("ns/p", AUDIT, True, WEB)]) == (None, [])
    assert json_patch(new_pod({"app": "web"}), [("ns/p", ENFORCE, False, WEB)]) == (None, [])
    assert json_patch(new_pod({"app": "db"}), [("ns/p", ENFORCE, True, WEB)]) == (None, [])
    assert json_patch(new_pod({"app": "web"}, [SCHEDULING_GATE]), [("ns/p", ENFORCE, True, WEB)]) == (
        None,
        [],
    )


def test_preset_entitlement_annotations_do_not_skip_the_gate() -> None:
    """Anyone who creates a pod can write its annotations: they never exempt it from the gate."""
    for preset in ("Granted", "Denied", "Pending"):
        body = new_pod({"app": "web"})
        body["metadata"]["annotations"] = {
            "marketplace.metering.dev/entitlement": preset,
            "marketplace.metering.dev/signature": "eyJhbGciOiJQUzI1NiJ9.e30.c2ln",
        }
        chosen, ops = json_patch(body, [("ns/p", ENFORCE, True, WEB)])
        assert chosen == "ns/p"
        assert ops == [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SCHEDULING_GATE}]}]
