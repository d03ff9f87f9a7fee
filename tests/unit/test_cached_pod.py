"""The compact pod the shared cache keeps: the gate's readers and metering see what they saw before."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

from metering_operator.domain import entitlement as ent
from metering_operator.domain.cached_pod import compact, same_for_gate
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
    # Nothing the gate never reads: the node (metering's view has it) and a phase not final.
    assert "nodeName" not in slim["spec"]
    assert "status" not in slim


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
    assert cached.labels is cached.view.labels
    assert "labels" not in cached.gate["metadata"]  # the cache's business, not the gate's


def test_terminating_reads_the_same_for_every_phase() -> None:
    for phase in ("Pending", "Running", "Succeeded", "Failed", "Unknown", None):
        pod = full_pod(None)
        if phase is None:
            del pod["status"]
        else:
            pod["status"]["phase"] = phase
        slim = compact(pod).gate
        assert ent.is_terminating(slim) == ent.is_terminating(pod), phase
        assert ("status" in slim) == (phase in ("Succeeded", "Failed")), phase


def versions(pod: dict[str, Any], rv: str, change: Any) -> tuple[Any, Any]:
    """The compact pod before and after ``change`` (applied to a copy) made it version ``rv``."""
    after = copy.deepcopy(pod)
    change(after)
    after["metadata"]["resourceVersion"] = rv
    return compact(pod), compact(after)


def test_changes_the_gate_does_not_read_leave_it_the_same() -> None:
    pod = full_pod({ANNOTATION_ENTITLEMENT: "Granted", "team": "a"})
    del pod["spec"]["nodeName"]  # not bound yet

    def bind(p: dict[str, Any]) -> None:
        p["spec"]["nodeName"] = "kwok-1"

    def run(p: dict[str, Any]) -> None:
        p["status"] = {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}

    def foreign_annotation(p: dict[str, Any]) -> None:
        p["metadata"]["annotations"]["team"] = "b"

    def topology_labels(p: dict[str, Any]) -> None:  # binding copies the node's onto the pod
        p["metadata"]["labels"]["topology.kubernetes.io/zone"] = "zone-a"

    def nothing(p: dict[str, Any]) -> None:
        pass

    for change in (bind, run, foreign_annotation, topology_labels, nothing):
        old, new = versions(pod, "43", change)
        assert new.resource_version != old.resource_version
        assert same_for_gate(old, new), change.__name__
        # ... while metering's view still sees what changed.
        if change is bind:
            assert (old.view.bound, new.view.bound) == (False, True)
        if change is run:
            assert (old.view.ready, new.view.ready) == (False, True)


def test_every_change_the_gate_reads_is_a_change() -> None:
    pod = full_pod({ANNOTATION_ENTITLEMENT: "Pending"})

    def tamper(p: dict[str, Any]) -> None:
        p["metadata"]["annotations"][ANNOTATION_SIGNATURE] = "forged"

    def grant_recorded(p: dict[str, Any]) -> None:
        p["metadata"]["annotations"][ANNOTATION_ENTITLEMENT] = "Granted"

    def annotations_gone(p: dict[str, Any]) -> None:
        del p["metadata"]["annotations"]

    def ungate(p: dict[str, Any]) -> None:
        p["spec"]["schedulingGates"] = []

    def another_gate(p: dict[str, Any]) -> None:
        p["spec"]["schedulingGates"].append({"name": "example.com/other"})

    def delete(p: dict[str, Any]) -> None:
        p["metadata"]["deletionTimestamp"] = "2031-03-04T10:05:00Z"

    def fail(p: dict[str, Any]) -> None:
        p["status"]["phase"] = "Failed"

    def new_owner(p: dict[str, Any]) -> None:
        p["metadata"]["ownerReferences"][0]["uid"] = "rs-2"

    def service_account(p: dict[str, Any]) -> None:
        p["spec"]["serviceAccountName"] = "other"

    for change in (
        tamper,
        grant_recorded,
        annotations_gone,
        ungate,
        another_gate,
        delete,
        fail,
        new_owner,
        service_account,
    ):
        old, new = versions(pod, "43", change)
        assert not same_for_gate(old, new), change.__name__
        assert not same_for_gate(new, old), change.__name__
