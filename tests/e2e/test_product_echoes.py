"""A MeteredProduct's status-only changes are skipped by the handlers that do not read them; what
they read is still acted on: a status someone else changed, and a spec change after the echoes.

The operator says what it decided in ``marketplace_metering_product_events_total`` (per handler:
acted on, or skipped), and the decisions show on the product: the reporter restores a tampered
``status.observedSpec``, the spec change leaves its Event and ``Enforced`` transition, and the gate
judges the new generation (``status.observedGeneration``).
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from metering_operator.domain.product import GROUP, PLURAL, VERSION
from tests.e2e.conftest import PRODUCT_CODE, OperatorFactory, OperatorProcess, wait_for
from tests.e2e.test_pins import Products, metric, wait_event
from tests.emulator.harness import EmulatorProcess

pytestmark = pytest.mark.cluster

EVENTS = "marketplace_metering_product_events_total"
HANDLERS = ("entitlement-gate-changes", "spec-report")


def decisions(op: OperatorProcess) -> dict[tuple[str, str], float]:
    return {
        (handler, outcome): metric(op, EVENTS, handler=handler, outcome=outcome) or 0.0
        for handler in HANDLERS
        for outcome in ("acted", "skipped")
    }


def apply_status(
    kube: client.ApiClient, namespace: str, manager: str, status: dict[str, Any]
) -> dict[str, Any]:
    """A server-side apply of ``status`` as another writer (admin: a buyer cannot write status)."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": "db", "namespace": namespace},
        "status": status,
    }
    written: dict[str, Any] = client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "db",
        body,
        field_manager=manager,
        force=True,
        _content_type="application/apply-patch+yaml",
    )
    return written


def test_status_echoes_are_skipped_and_what_a_handler_reads_is_still_acted_on(
    kube: client.ApiClient, namespace: str, operator: OperatorFactory, buyer_emulator: EmulatorProcess
) -> None:
    admin = Products(kube)
    admin.create(
        namespace,
        "db",
        {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "publicKey": {"pem": buyer_emulator.admin.public_key_pem(PRODUCT_CODE, 1)},
            "selector": {"matchLabels": {"app": "db"}},
            "entitlement": {"mode": "Enforce", "scope": "Pod"},
        },
    )
    op = operator(namespace, buyer_emulator, webhook=False)
    admin.wait_condition(namespace, "db", "Enforced", "Enforced")
    wait_for(
        "the gate's status",
        lambda: (admin.get(namespace, "db").get("status") or {}).get("observedGeneration") == 1,
    )
    before = decisions(op)

    # Five writes of someone else's condition: nothing either handler reads changes.
    for i in range(5):
        apply_status(
            kube,
            namespace,
            "e2e-echo",
            {
                "conditions": [
                    {
                        "type": "E2EEcho",
                        "status": "True",
                        "reason": "Echo",
                        "message": f"echo {i}",
                        "lastTransitionTime": "2031-01-01T00:00:00Z",
                    }
                ]
            },
        )
    wait_for(
        "five echoes skipped by each handler",
        lambda: all(decisions(op)[(h, "skipped")] - before[(h, "skipped")] >= 5 for h in HANDLERS),
    )
    quiet = decisions(op)
    assert all(quiet[(h, "acted")] == before[(h, "acted")] for h in HANDLERS), (before, quiet)

    # A status part the reporter owns, changed by someone else: looked at, and restored.
    observed = dict(admin.get(namespace, "db")["status"]["observedSpec"])
    tampered = apply_status(kube, namespace, "e2e-tamper", {"observedSpec": {**observed, "mode": "Off"}})
    assert tampered["status"]["observedSpec"]["mode"] == "Off"
    wait_for(
        "observedSpec restored by the reporter",
        lambda: admin.get(namespace, "db")["status"]["observedSpec"]["mode"] == "Enforce",
    )

    # A spec change after all those echoes: reported, and judged by the gate.
    admin.patch(namespace, "db", {"entitlement": {"mode": "Audit"}})
    wait_event(
        kube, namespace, "db", "EntitlementModeChanged", "spec.entitlement.mode changed from Enforce to Audit"
    )
    admin.wait_condition(namespace, "db", "Enforced", "EntitlementAudit")
    wait_for(
        "the gate judging generation 2",
        lambda: admin.get(namespace, "db")["status"]["observedGeneration"] == 2,
    )
    after = decisions(op)
    assert after[("spec-report", "acted")] >= quiet[("spec-report", "acted")] + 2  # the tamper, the spec
    assert after[("entitlement-gate-changes", "acted")] >= quiet[("entitlement-gate-changes", "acted")] + 1
