"""Entitlement decisions, error classes and patches (domain/entitlement.py, domain/selectors.py)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import jsonpatch
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.domain import entitlement as ent
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_PRODUCT,
    ANNOTATION_REGISTERED_AT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    EntitlementMode,
    EntitlementState,
    LabelSelector,
    PodCounts,
)
from metering_operator.domain.selectors import matches, to_query
from metering_operator.domain.signature import ProductKey

ENFORCE, AUDIT, OFF = EntitlementMode.ENFORCE, EntitlementMode.AUDIT, EntitlementMode.OFF
G, D, P, E = (
    EntitlementState.GRANTED,
    EntitlementState.DENIED,
    EntitlementState.PENDING,
    EntitlementState.ERROR,
)


def pod(
    *,
    gated: bool = True,
    state: str | None = None,
    other_gates: tuple[str, ...] = (),
    annotations: bool = True,
    deleting: bool = False,
    phase: str = "Pending",
) -> dict[str, Any]:
    gate_list = [{"name": g} for g in other_gates]
    if gated:
        gate_list.insert(len(gate_list) // 2, {"name": SCHEDULING_GATE})
    meta: dict[str, Any] = {"name": "p", "namespace": "ns", "uid": "u-1", "resourceVersion": "42"}
    if annotations:
        meta["annotations"] = {"seller/x": "y"}
        if state:
            meta["annotations"][ANNOTATION_ENTITLEMENT] = state
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta, "spec": {"schedulingGates": gate_list}, "status": {"phase": phase}}


# --- patches are checked by effect (RFC 6902, the jsonpatch library kopf itself uses) ------------


PatchTestFailed = jsonpatch.JsonPatchTestFailed


def apply(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(doc, ops)
    return result


# --- proof: only a signature for the pod's own uid ----------------------------------------------------
# (Replaces the former ``decide`` table, which took a pre-set ``Granted`` or ``Denied`` annotation as
# final -- the threat model forbids that; the state machine's tests cover what happens to such pods.)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def signed(private: rsa.RSAPrivateKey, nonce: str) -> str:
    claims = {"productCode": "code", "publicKeyVersion": 1, "nonce": nonce, "iat": 1_900_000_000}
    return jwt.encode(claims, private, algorithm="PS256")


def test_proven_grant_needs_a_signature_for_the_pods_own_uid(signing_key: rsa.RSAPrivateKey) -> None:
    key = ProductKey("code", 1, signing_key.public_key())
    own = pod(state="Granted")
    own["metadata"]["annotations"][ANNOTATION_SIGNATURE] = signed(signing_key, "u-1")
    verified = ent.proven_grant(own, key)
    assert verified is not None
    assert verified.nonce == "u-1"
    copied = pod(state="Granted")
    copied["metadata"]["annotations"][ANNOTATION_SIGNATURE] = signed(signing_key, "another-pod")
    assert ent.proven_grant(copied, key) is None
    assert ent.proven_grant(pod(state="Granted"), key) is None  # the word "Granted" proves nothing
    garbage = pod()
    garbage["metadata"]["annotations"][ANNOTATION_SIGNATURE] = "not-a-jwt"
    assert ent.proven_grant(garbage, key) is None
    # Scope Cluster: the nonce is the kube-system uid, given explicitly.
    assert ent.proven_grant(copied, key, nonce="another-pod") is not None


# --- patches ----------------------------------------------------------------------------------------

WHEN = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def test_grant_patch_removes_only_our_gate_and_annotates() -> None:
    before = pod(other_gates=("a/one", "b/two"), state="Pending")
    before["metadata"]["annotations"][ent.ANNOTATION_REASON] = "Throttling"
    after = apply(before, ent.grant_patch(before, signature="jwt", registered_at=WHEN, product_key="ns/prod"))
    assert ent.gates(after) == ["a/one", "b/two"]
    notes = after["metadata"]["annotations"]
    assert notes[ANNOTATION_ENTITLEMENT] == "Granted"
    assert notes[ANNOTATION_SIGNATURE] == "jwt"
    assert notes[ANNOTATION_REGISTERED_AT] == "2026-03-04T05:06:07Z"
    assert notes[ANNOTATION_PRODUCT] == "ns/prod"
    assert ent.ANNOTATION_REASON not in notes
    assert notes["seller/x"] == "y"


def test_grant_patch_creates_annotations_map_when_missing() -> None:
    before = pod(annotations=False)
    after = apply(before, ent.grant_patch(before, signature="s", registered_at=WHEN, product_key="ns/p"))
    assert after["metadata"]["annotations"][ANNOTATION_ENTITLEMENT] == "Granted"
    assert ent.gates(after) == []


def test_patch_fails_if_pod_changed_meanwhile() -> None:
    before = pod()
    ops = ent.grant_patch(before, signature="s", registered_at=WHEN, product_key="ns/p")
    changed = copy.deepcopy(before)
    changed["metadata"]["resourceVersion"] = "43"
    with pytest.raises(PatchTestFailed):
        apply(changed, ops)


def test_patch_refuses_pod_without_resource_version() -> None:
    before = pod()
    del before["metadata"]["resourceVersion"]
    with pytest.raises(ValueError, match="resourceVersion"):
        ent.grant_patch(before, signature="s", registered_at=WHEN, product_key="ns/p")


def test_denied_patch_keeps_gate() -> None:
    before = pod()
    after = apply(before, ent.state_patch(before, D, "CustomerNotEntitledException: no", product_key="ns/p"))
    assert ent.is_gated(after)
    assert ent.entitlement_state(after) is D
    assert after["metadata"]["annotations"][ent.ANNOTATION_REASON].startswith("CustomerNotEntitled")


def test_audit_denial_releases() -> None:
    before = pod()
    after = apply(
        before, ent.state_patch(before, D, "CustomerNotEntitledException", product_key="ns/p", release=True)
    )
    assert not ent.is_gated(after)
    assert ent.entitlement_state(after) is D


def test_state_patch_refuses_granted() -> None:
    with pytest.raises(ValueError, match="grant_patch"):
        ent.state_patch(pod(), G, "x", product_key="ns/p")


def test_release_patch_on_ungated_pod_only_tests() -> None:
    ops = ent.release_patch(pod(gated=False))
    assert [op["op"] for op in ops] == ["test"]


def test_needs_state_write() -> None:
    p = pod(state="Pending")
    p["metadata"]["annotations"][ent.ANNOTATION_REASON] = "ThrottlingException"
    assert not ent.needs_state_write(p, P, "ThrottlingException")
    assert ent.needs_state_write(p, P, "InternalServiceErrorException")
    assert ent.needs_state_write(p, E, "ThrottlingException")


# --- summaries and conditions ------------------------------------------------------------------------


def test_count_and_workload_summary() -> None:
    assert ent.count_pods([G, G, None, P, E, D]) == PodCounts(registered=2, pending=3, denied=1)
    assert ent.workload_summary([G, G, G]) == "Granted 3/3"
    assert ent.workload_summary([G, None, P]) == "Pending 1/3"
    assert ent.workload_summary([G, D, None]) == "Denied 1/3"


def test_workload_annotations_carry_the_summary_and_the_latest_verified_signature() -> None:
    older = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    newest = datetime(2026, 3, 4, 6, 0, tzinfo=UTC)
    members = [
        ent.MemberView(G, "older", older),
        ent.MemberView(G, "newest", newest),
        ent.MemberView(None),
    ]
    assert ent.workload_annotations(members) == {
        ANNOTATION_ENTITLEMENT: "Pending 2/3",
        ANNOTATION_SIGNATURE: "newest",
        ANNOTATION_REGISTERED_AT: "2026-03-04T06:00:00Z",
    }
    assert ent.workload_annotations([ent.MemberView(D)]) == {ANNOTATION_ENTITLEMENT: "Denied 1/1"}


def test_entitled_condition_reasons() -> None:
    c = ent.entitled_condition(ENFORCE, PodCounts(denied=2), last_denial="CustomerNotEntitledException: nope")
    assert (c.status, c.reason) == ("False", "CustomerNotEntitled")
    assert "2 pod(s) denied" in c.message
    assert "nope" in c.message
    c = ent.entitled_condition(ENFORCE, PodCounts(registered=3))
    assert (c.status, c.reason) == ("True", "Registered")
    c = ent.entitled_condition(ENFORCE, PodCounts(registered=1, pending=2), last_error="ThrottlingException")
    assert (c.status, c.reason) == ("Unknown", "RegistrationFailing")
    c = ent.entitled_condition(AUDIT, PodCounts(registered=1), ungated=1)
    assert "without the entitlement gate" in c.message
    assert ent.entitled_condition(OFF, PodCounts()).reason == "EntitlementOff"
    assert ent.entitled_condition(ENFORCE, PodCounts()).reason == "NoPods"


# --- selectors -----------------------------------------------------------------------------------------


def test_selector_match_and_query() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web", "tier": "front"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "dev"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "team", "operator": "Exists"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
            ],
        }
    )
    good = {"app": "web", "tier": "front", "env": "prod", "team": "a"}
    assert matches(sel, good)
    assert not matches(sel, {**good, "canary": "1"})
    assert not matches(sel, {**good, "env": "qa"})
    assert not matches(sel, {**good, "zone": "x"})
    assert not matches(sel, {k: v for k, v in good.items() if k != "team"})
    assert not matches(sel, {**good, "app": "db"})
    assert to_query(sel) == "app=web,tier=front,env in (dev,prod),!canary,team,zone notin (x)"
    empty = LabelSelector()
    assert matches(empty, None)
    assert to_query(empty) == ""


def test_gating_product() -> None:
    enforce = ent.GateCandidate("ns/a", ENFORCE, trusted=True, selects=True)
    audit = ent.GateCandidate("ns/b", AUDIT, trusted=True, selects=True)
    untrusted = ent.GateCandidate("ns/c", ENFORCE, trusted=False, selects=True)
    other = ent.GateCandidate("ns/d", ENFORCE, trusted=True, selects=False)
    assert ent.gating_product(pod(gated=False), [audit, untrusted, other, enforce]) == "ns/a"
    assert ent.gating_product(pod(gated=False), [audit, untrusted, other]) is None
    assert ent.gating_product(pod(gated=True), [enforce]) is None
    # Annotations are no reason to skip the gate: whoever creates the pod can write them.
    for preset in ("Granted", "Denied", "Pending"):
        assert ent.gating_product(pod(gated=False, state=preset), [enforce]) == "ns/a"
