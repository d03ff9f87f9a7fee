"""The operator removes its records of deleted MeteredProducts once they cannot matter, and no other.

Records (denials, metering journal) are ConfigMaps in the operator's namespace named after the
product, so a product deleted and created again finds them (tests/e2e/test_entitlement.py,
test_metering_faults.py). Each record here is set up as a leftover of an earlier product; every
record kept is then released by exactly the change that makes it useless (its pod deleted, the
clock past the restore horizon, its product deleted), and removed at the sweep after.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.domain.conditions import format_time
from metering_operator.domain.product import ANNOTATION_PRODUCT, GROUP, MANAGED_BY, MANAGED_BY_LABEL, PLURAL
from metering_operator.kube import journal, records
from tests.conftest import temporary_namespace
from tests.e2e.conftest import PRODUCT_CODE, OperatorFactory, wait_for
from tests.emulator.harness import EmulatorProcess

pytestmark = pytest.mark.cluster


@pytest.fixture
def operator_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-ops-") as name:
        yield name


def _denials(namespace: str, product: str, pods: dict[str, str]) -> dict[str, Any]:
    return {
        "metadata": {
            "name": records.record_name(namespace, product),
            "labels": {**records.MANAGED_BY, **records.COMPONENT},
            "annotations": {ANNOTATION_PRODUCT: f"{namespace}/{product}"},
        },
        "data": {
            uid: json.dumps({"pod": pod, "reason": "NotEntitled", "at": "2026-01-01T00:00:00Z"})
            for uid, pod in pods.items()
        },
    }


def _journal(namespace: str, product: str, open_hour: str) -> dict[str, Any]:
    content = {
        "product": f"{namespace}/{product}",
        "productCode": "prod-sweep",
        "metering": {"openHour": {"start": open_hour, "dimensions": []}, "ledger": []},
    }
    return {
        "metadata": {
            "name": journal.configmap_name(namespace, product),
            "labels": {journal.LABEL: "true", MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {ANNOTATION_PRODUCT: f"{namespace}/{product}"},
        },
        "data": {journal.DATA_KEY: json.dumps(content)},
    }


def _counter(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^marketplace_metering_{name}(?:\{{{re.escape(selector)}\}})? ([0-9.e+]+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_records_of_deleted_products_are_removed_once_useless_and_no_sooner(
    kube: client.ApiClient,
    namespace: str,
    operator_namespace: str,
    buyer_emulator: EmulatorProcess,
    operator: OperatorFactory,
) -> None:
    core = client.CoreV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    hour = buyer_emulator.admin.clock().replace(minute=0, second=0, microsecond=0)
    pod = core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "still-here"},
            "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
        },
    )
    custom.create_namespaced_custom_object(
        GROUP,
        "v1alpha1",
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/v1alpha1",
            "kind": "MeteredProduct",
            "metadata": {"name": "alive"},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "publicKey": {"pem": buyer_emulator.admin.public_key_pem(PRODUCT_CODE, 1)},
                "selector": {"matchLabels": {"app": "nothing"}},
                "entitlement": {"mode": "Audit", "scope": "Pod"},
            },
        },
    )
    leftovers = {
        # removed at once: product gone, its pod gone / its journal 30 hours old
        "denials-gone": _denials(namespace, "gone", {"uid-of-a-deleted-pod": "deleted-pod"}),
        "journal-old": _journal(namespace, "old", format_time(hour - timedelta(hours=30))),
        # kept: a pod it names still exists (same uid) / its open hour is the current one
        "denials-pod-alive": _denials(namespace, "gone-pod-alive", {pod.metadata.uid: "still-here"}),
        "journal-fresh": _journal(namespace, "fresh", format_time(hour)),
        # kept: the product exists
        "denials-alive": _denials(namespace, "alive", {"uid-of-another-deleted-pod": "x"}),
        # kept: not a record kind this operator knows / not the operator's at all
        "unknown-kind": {
            "metadata": {
                "name": "mmo-something-else",
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
                "annotations": {ANNOTATION_PRODUCT: f"{namespace}/gone"},
            },
            "data": {},
        },
        "not-ours": {"metadata": {"name": "seller-settings"}, "data": {"k": "v"}},
    }
    names = {key: obj["metadata"]["name"] for key, obj in leftovers.items()}
    for obj in leftovers.values():
        core.create_namespaced_config_map(operator_namespace, obj)

    proc = operator(
        namespace,
        buyer_emulator,
        webhook=False,
        extra_args=[
            "--operator-namespace",
            operator_namespace,
            "--emulator-clock-url",
            buyer_emulator.url,
            "--record-sweep-interval-seconds",
            "0.5",
        ],
    )

    def present() -> set[str]:
        items = core.list_namespaced_config_map(operator_namespace).items
        existing = {cm.metadata.name for cm in items}
        return {key for key, name in names.items() if name in existing}

    def after_next_sweep() -> set[str]:
        """What exists once a sweep that started after this call has finished."""
        before = _counter(proc.metrics(), "record_sweeps_total")
        wait_for("a sweep", lambda: _counter(proc.metrics(), "record_sweeps_total") >= before + 2)
        return present()

    def removed(kind: str) -> float:
        return _counter(proc.metrics(), "records_removed_total", kind=kind)

    kept = {"denials-pod-alive", "journal-fresh", "denials-alive", "unknown-kind", "not-ours"}
    wait_for("the useless records removed", lambda: present() == kept)
    assert after_next_sweep() == kept
    assert (removed("denials"), removed("journal")) == (1, 1)

    # Each kept record goes once the one thing that kept it is gone.
    core.delete_namespaced_pod("still-here", namespace, grace_period_seconds=0)
    wait_for("the pod deleted", lambda: _pod_gone(core, namespace, "still-here"))
    kept -= {"denials-pod-alive"}
    wait_for("the record of a deleted pod removed", lambda: present() == kept)

    buyer_emulator.admin.advance_clock(timedelta(hours=25, minutes=1).total_seconds())
    kept -= {"journal-fresh"}
    wait_for("the journal past the restore horizon removed", lambda: present() == kept)

    custom.delete_namespaced_custom_object(GROUP, "v1alpha1", namespace, PLURAL, "alive")
    kept -= {"denials-alive"}
    wait_for("the record of a product deleted now removed", lambda: present() == kept)
    assert after_next_sweep() == {"unknown-kind", "not-ours"}
    assert (removed("denials"), removed("journal")) == (3, 2)
    seller = core.read_namespaced_config_map("seller-settings", operator_namespace)
    assert seller.data == {"k": "v"}


def _pod_gone(core: client.CoreV1Api, namespace: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, namespace)
    except ApiException as exc:
        return bool(exc.status == 404)
    return False
