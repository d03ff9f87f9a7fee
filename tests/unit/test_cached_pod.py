"""The compact pod the shared cache keeps: the gate's readers and metering see what they saw before."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from metering_operator.domain import entitlement as ent
from metering_operator.domain.cached_pod import compact
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    EntitlementState,
)
from metering_operator.domain.sampling import pod_view


def full_pod(annotations: dict[str, str] | None, **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "db-0",
        "namespace": "shop",
        "uid": "u-1",
        "resourceVersion": "42",
        "creationTimestamp": "2031-03-04T10:00:00Z",
        "labels": {"app": "db"},
        "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "db-1", "uid": "rs", "controller": True},
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "other", "uid": "cm"},
        ],
        "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:metadata": {}}}],
        **extra,
    }
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "metadata": meta,
        "spec": {
            "serviceAccountName": "db",
            "nodeName": "kwok-0",
            "schedulingGates": [{"name": SCHEDULING_GATE}],
            "containers": [
                {"name": "c", "image": "x", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}
            ],
            "volumes": [{"name": "v", "emptyDir": {}}],
        },
        "status": {"phase": "Pending", "conditions": [{"type": "Ready", "status": "False"}]},
    }


def test_the_gates_readers_agree_on_the_compact_form() -> None:
    pod = full_pod(
        {
            ANNOTATION_ENTITLEMENT: "Granted",
            ANNOTATION_SIGNATURE: "token",
            "kubectl.kubernetes.io/last-applied-configuration": "x" * 4000,
        },
        deletionTimestamp="2031-03-04T10:05:00Z",
    )
    slim = compact(pod).gate
    assert ent.is_gated(slim) == ent.is_gated(pod) is True
    assert ent.gates(slim) == ent.gates(pod)
    assert ent.is_terminating(slim) == ent.is_terminating(pod)
    assert ent.entitlement_state(slim) == ent.entitlement_state(pod)
    assert ent.annotated_signature(slim) == ent.annotated_signature(pod)
    at = datetime(2031, 3, 4, 10, 1, tzinfo=UTC)
    assert ent.grant_patch(slim, signature="s", registered_at=at, product_key="shop/db") == ent.grant_patch(
        pod, signature="s", registered_at=at, product_key="shop/db"
    )
    # Only the operator's own annotations, the controller owner, the fields the registrar reads.
    assert set(slim["metadata"]["annotations"]) == {ANNOTATION_ENTITLEMENT, ANNOTATION_SIGNATURE}
    assert [r["kind"] for r in slim["metadata"]["ownerReferences"]] == ["ReplicaSet"]
    assert slim["spec"]["serviceAccountName"] == "db"
    assert slim["metadata"]["creationTimestamp"] == "2031-03-04T10:00:00Z"
    assert "managedFields" not in slim["metadata"]
    assert "containers" not in slim["spec"]


def test_annotations_absent_or_foreign_only_give_the_same_patch() -> None:
    at = datetime(2031, 3, 4, 10, 1, tzinfo=UTC)
    for notes in (None, {"team": "a"}):
        pod = full_pod(notes)
        slim = compact(pod).gate
        assert ent.state_patch(
            slim, EntitlementState.PENDING, "Throttled: x", product_key="shop/db", release=False
        ) == ent.state_patch(
            pod, EntitlementState.PENDING, "Throttled: x", product_key="shop/db", release=False
        )
        assert ent.grant_patch(slim, signature="s", registered_at=at, product_key="k") == ent.grant_patch(
            pod, signature="s", registered_at=at, product_key="k"
        )


def test_metering_view_is_the_same() -> None:
    pod = full_pod(None)
    cached = compact(pod)
    assert cached.view == pod_view(pod)
    assert cached.uid == "u-1"
    assert cached.resource_version == "42"
    assert cached.labels is cached.view.labels is cached.gate["metadata"]["labels"]
