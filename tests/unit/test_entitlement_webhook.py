"""The admission webhook's mutation: handlers/entitlement.gate_pod on kopf's own Patch object, and
the direct path (DirectGate answered by kube/webhook.AdmissionServer) that serves it in the operator."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import ssl
from pathlib import Path
from typing import Any, cast

import aiohttp
import jsonpatch
import kopf

from metering_operator.domain.product import SCHEDULING_GATE, EntitlementMode, LabelSelector
from metering_operator.handlers.entitlement import DirectGate, gate_ops, gate_pod
from metering_operator.kube.webhook import HANDLER_ID, WEBHOOK_PATH, AdmissionServer, generate_serving_certs

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


# --- the direct path (kube/webhook.AdmissionServer + handlers/entitlement.DirectGate) ----------------

CASES: list[tuple[dict[str, Any], list[tuple[str, EntitlementMode, bool, LabelSelector]]]] = [
    (new_pod({"app": "web"}), [("ns/p", ENFORCE, True, WEB)]),
    (new_pod({"app": "web"}, ["other/gate"]), [("ns/p", ENFORCE, True, WEB)]),
    (new_pod({"app": "web"}), [("ns/p", AUDIT, True, WEB)]),
    (new_pod({"app": "web"}), [("ns/p", ENFORCE, False, WEB)]),
    (new_pod({"app": "db"}), [("ns/p", ENFORCE, True, WEB)]),
    (new_pod({"app": "web"}, [SCHEDULING_GATE]), [("ns/p", ENFORCE, True, WEB)]),
    (new_pod({"app": "web"}), [("ns/a", AUDIT, True, WEB), ("ns/p", ENFORCE, True, WEB)]),
]


def test_direct_ops_give_the_same_pod_as_kopfs_patch() -> None:
    """Applied to the pod, the direct path's ops and kopf's diffed patch give the same object."""
    for body, products in CASES:
        _, kopf_ops = json_patch(copy.deepcopy(body), products)
        direct_ops = gate_ops(body, products) or []
        assert jsonpatch.apply_patch(body, direct_ops) == jsonpatch.apply_patch(body, kopf_ops), (
            body,
            products,
        )


def review(body: dict[str, Any], operation: str = "CREATE") -> dict[str, Any]:
    return {"uid": "req-1", "operation": operation, "namespace": "ns", "object": body}


def test_direct_gate_reads_the_namespace_from_the_index_and_only_gates_creates() -> None:
    gate = DirectGate({"ns": [("ns/p", ENFORCE, True, WEB)]})
    ops = gate(review(new_pod({"app": "web"})))
    assert ops == [{"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SCHEDULING_GATE}]}]
    assert gate(review(new_pod({"app": "web"}), operation="UPDATE")) is None
    other = new_pod({"app": "web"})
    other["metadata"]["namespace"] = "elsewhere"
    assert gate(review(other)) is None


def test_direct_gate_admits_ungated_when_it_fails() -> None:
    """A bug in the gate must not stop a buyer's pods (the product watch still finds them)."""

    class Broken(dict[str, Any]):
        def get(self, *_: Any) -> Any:
            raise RuntimeError("index broken")

    assert DirectGate(Broken())(review(new_pod({"app": "web"}))) is None


def test_admission_server_answers_the_direct_handler_over_tls(tmp_path: Path) -> None:
    """The real server (kopf's, TLS with our certificates) answers an AdmissionReview itself,
    without calling kopf's handler machinery (``fn``), with a base64 JSON patch that admits."""
    certs = generate_serving_certs(tmp_path, ["127.0.0.1"])
    server = AdmissionServer(
        addr="127.0.0.1", host="127.0.0.1", certfile=str(certs.cert_file), pkeyfile=str(certs.key_file)
    )
    server.direct[HANDLER_ID] = DirectGate({"ns": [("ns/p", ENFORCE, True, WEB)]})
    kopf_calls: list[Any] = []

    async def kopf_fn(*args: Any, **kwargs: Any) -> Any:
        kopf_calls.append(args)
        raise AssertionError("kopf's path must not be taken")

    async def exchange() -> tuple[int, dict[str, Any]]:
        configs: Any = server(kopf_fn)  # an async generator: closing it stops the server
        config = await configs.__anext__()
        url = str(config["url"]).rstrip("/") + WEBHOOK_PATH
        try:
            context = ssl.create_default_context(cadata=certs.ca_pem.decode())
            body: dict[str, Any] = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}
            body["request"] = review(new_pod({"app": "web"}))
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json=body, ssl=context) as resp,
            ):
                return resp.status, await resp.json()
        finally:
            await configs.aclose()

    status, answer = asyncio.run(exchange())
    assert status == 200
    assert kopf_calls == []
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "req-1"
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    assert json.loads(base64.b64decode(response["patch"])) == [
        {"op": "add", "path": "/spec/schedulingGates", "value": [{"name": SCHEDULING_GATE}]}
    ]
