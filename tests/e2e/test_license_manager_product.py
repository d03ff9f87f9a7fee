"""A License Manager (contract) product whose issuer key cannot be loaded fails closed.

Contract products are served (tests/e2e/test_contract_seats.py); this holds what
docs/pricing-models.md promises when the configured ``issuerPublicKey`` is unusable (here: a
ConfigMap that does not exist): the product is accepted and stored, says ``Ready=False
PublicKeyUnavailable``, and its Enforce-mode pods stay behind the gate; nothing is registered with
(or checked out of) AWS on its behalf. On the real API server with the operator as a real process
and the emulator as AWS.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from metering_operator.domain.product import GROUP, PLURAL, SCHEDULING_GATE, VERSION
from tests.e2e.conftest import PRODUCT_CODE, OperatorFactory, wait_for
from tests.emulator.harness import EmulatorProcess

pytestmark = pytest.mark.cluster


def contract_product(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": "contract", "namespace": namespace},
        "spec": {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "selector": {"matchLabels": {"app": "contract"}},
            "entitlement": {
                "mode": "Enforce",
                "source": "LicenseManager",
                "licenseManager": {
                    "productSKU": "prod-contract-e2e",
                    "entitlements": [{"name": "seats", "perPod": 1}],
                    "issuerPublicKey": {"configMapKeyRef": {"name": "no-such-issuer-key", "key": "pem"}},
                },
            },
        },
    }


def test_a_license_manager_product_without_its_issuer_key_is_not_ready_and_its_pods_stay_gated(
    kube: client.ApiClient,
    namespace: str,
    buyer_emulator: EmulatorProcess,
    operator: OperatorFactory,
) -> None:
    operator(namespace, buyer_emulator, extra_args=["--trusted-product-code", PRODUCT_CODE])
    custom = client.CustomObjectsApi(kube)
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, contract_product(namespace))

    def ready() -> dict[str, Any] | None:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "contract")
        conditions = (obj.get("status") or {}).get("conditions") or []
        found = next((c for c in conditions if c["type"] == "Ready"), None)
        return dict(found) if found else None

    condition = wait_for("the product's Ready condition", ready)
    assert condition["status"] == "False", condition
    assert condition["reason"] == "PublicKeyUnavailable", condition
    assert "no-such-issuer-key" in condition["message"]

    # Created once the operator has seen the product, so the admission webhook knows it too.
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "contract-0", "labels": {"app": "contract"}},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
        },
    )

    pod = core.read_namespaced_pod("contract-0", namespace)
    assert [gate.name for gate in pod.spec.scheduling_gates or []] == [SCHEDULING_GATE]
    assert pod.status.phase == "Pending"
    assert buyer_emulator.admin.registrations() == []
    assert buyer_emulator.admin.events(operation="CheckoutLicense") == []
