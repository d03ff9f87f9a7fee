"""The gate's state machine (gate/machine.py), driven message by message with a fake clock.

Nothing here sleeps or touches a cluster: each test feeds ``step`` what the API server and the
workers would say and checks the effects it asks for. Signatures are real PS256 JWTs made with a
key generated here, so "proof" means exactly what it means in the operator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.domain.entitlement import UngatedPodAction
from metering_operator.domain.onfailure import Hold
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    EntitlementState,
    MeteredProductSpec,
    Registration,
)
from metering_operator.gate import cluster as cluster_scope
from metering_operator.gate import machine
from metering_operator.gate import model as m
from metering_operator.gate.product import ProductInfo
from metering_operator.kube.pods import WorkloadRef

CODE = "1fszvu527waovqeuhpkyx2b5d"
T0 = datetime(2031, 3, 4, 10, 0, tzinfo=UTC)
KUBE_SYSTEM = "kube-system-uid"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def sign(key: rsa.RSAPrivateKey, nonce: str, iat: datetime = T0, code: str = CODE) -> str:
    claims = {"productCode": code, "publicKeyVersion": 1, "nonce": nonce, "iat": int(iat.timestamp())}
    return jwt.encode(claims, key, algorithm="PS256")


def info(
    key: rsa.RSAPrivateKey, mode: str = "Enforce", scope: str = "Pod", generation: int = 1
) -> ProductInfo:
    spec = MeteredProductSpec.model_validate(
        {
            "productCode": CODE,
            "publicKeyVersion": 1,
            "publicKey": {"pem": "-----BEGIN PUBLIC KEY-----\nunused\n-----END PUBLIC KEY-----"},
            "selector": {"matchLabels": {"app": "paid"}},
            "entitlement": {"mode": mode, "scope": scope},
        }
    )
    return ProductInfo("shop", "paid", "product-uid", generation, spec, True, key.public_key(), None)


def pod(
    uid: str = "u1", *, gated: bool = True, notes: dict[str, str] | None = None, rv: str = "1"
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": rv,
            "annotations": dict(notes or {}),
        },
        "spec": {"schedulingGates": [{"name": SCHEDULING_GATE}] if gated else []},
        "status": {"phase": "Pending" if gated else "Running"},
    }


class Driver:
    """Feeds messages to ``step`` with a clock that only moves when told to."""

    def __init__(self, product: ProductInfo, **policy: Any) -> None:
        self.now = T0
        self.state = m.GateState(policy=m.GatePolicy(**policy))
        self.effects: list[m.Effect] = []
        self.send(m.ProductChanged(product))

    def send(self, message: m.Message) -> list[m.Effect]:
        self.state, effects = machine.step(self.state, message, self.now)
        self.effects += effects
        return effects

    def list(self, *pods: dict[str, Any], denials: dict[str, str] | None = None) -> list[m.Effect]:
        return self.send(m.Listed(tuple(pods), denials or {}))

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def record(self, uid: str = "u1") -> m.PodRecord:
        return self.state.pods[uid]


def kinds(effects: Sequence[m.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def events(effects: Sequence[m.Effect]) -> list[tuple[str, str]]:
    return [(e.ref["kind"], e.reason) for e in effects if isinstance(e, m.PostEvent)]


# --- only proof grants --------------------------------------------------------------------------------


def test_new_gated_pod_is_registered_then_granted_with_one_write(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    assert kinds(d.list(pod())) == ["Register"]
    token = sign(key, "u1")
    effects = d.send(m.Registered("u1", m.Granted(token, T0)))
    (write,) = effects
    assert isinstance(write, m.WriteGrant)
    assert write.proof.token == token
    released = pod(
        gated=False, notes={ANNOTATION_SIGNATURE: token, ANNOTATION_ENTITLEMENT: "Granted"}, rv="2"
    )
    assert d.send(m.Written("u1", released)) == []
    assert d.record().state is EntitlementState.GRANTED
    assert d.state.counts().registered == 1
    # Every later observation of the granted pod costs nothing.
    assert d.send(m.PodUpdated(released)) == []


@pytest.mark.parametrize("preset", ["Granted", "Denied", "Pending", "Error", "garbage"])
@pytest.mark.parametrize("gated", [True, False])
def test_preset_entitlement_annotations_are_never_a_decision(
    key: rsa.RSAPrivateKey, preset: str, gated: bool
) -> None:
    d = Driver(info(key))
    effects = d.list(pod(gated=gated, notes={ANNOTATION_ENTITLEMENT: preset}))
    assert "Register" in kinds(effects)
    assert d.record().state is None
    assert d.state.counts().registered == 0


def test_signature_copied_from_another_pod_is_no_proof(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    copied = {ANNOTATION_ENTITLEMENT: "Granted", ANNOTATION_SIGNATURE: sign(key, "some-other-pod")}
    assert kinds(d.list(pod(gated=True, notes=copied))) == ["Register"]
    assert d.record().granted is None


def test_signature_from_another_key_or_product_is_no_proof(key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    d = Driver(info(key))
    d.list(
        pod("a", notes={ANNOTATION_SIGNATURE: sign(other, "a")}),
        pod("b", notes={ANNOTATION_SIGNATURE: sign(key, "b", code="someotherproduct")}),
    )
    assert d.state.counts().registered == 0
    assert kinds(d.effects).count("Register") == 2


def test_valid_signature_for_the_pods_own_uid_is_proof_after_a_restart(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    own = {ANNOTATION_ENTITLEMENT: "Granted", ANNOTATION_SIGNATURE: sign(key, "u1")}
    assert d.list(pod(gated=False, notes=own)) == []
    assert d.record().state is EntitlementState.GRANTED
    # Gated although proven (a gate re-added by hand): the operator removes it, no AWS call.
    assert kinds(d.send(m.PodUpdated(pod(gated=True, notes=own, rv="2")))) == ["WriteGrant"]


def test_operator_never_removes_a_gate_it_has_not_earned(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod(notes={ANNOTATION_ENTITLEMENT: "Granted"}))
    d.send(m.Registered("u1", m.Failed("InvalidSignature: nope", transient=False)))
    assert not any(isinstance(e, m.WriteGrant) for e in d.effects)
    assert not any(isinstance(e, m.WriteState) and e.release for e in d.effects)


# --- denials ------------------------------------------------------------------------------------------


def test_denial_is_recorded_durably_before_the_pod_and_never_registered_again(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod())
    (deny,) = d.send(m.Registered("u1", m.Denied("CustomerNotEntitledException: no")))
    assert isinstance(deny, m.Deny)
    assert deny.durable
    assert not deny.release
    d.send(m.Written("u1", pod(notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")))
    assert d.state.counts().denied == 1
    # A restart: the denial comes from the operator's record, whatever the pod says now.
    restarted = Driver(info(key))
    effects = restarted.list(
        pod(notes={ANNOTATION_ENTITLEMENT: "Pending"}), denials={"u1": "CustomerNotEntitled"}
    )
    assert kinds(effects) == ["WriteState"]  # the annotation is put back, nothing registered
    assert restarted.record().state is EntitlementState.DENIED


def test_failed_denial_record_is_retried_before_anything_else(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod())
    d.send(m.Registered("u1", m.Denied("CustomerNotEntitledException: no")))
    (schedule,) = d.send(m.Written("u1", None, error="KubernetesApi500: boom (denial record)"))
    assert isinstance(schedule, m.Schedule)
    d.now = schedule.at
    (again,) = d.send(m.Due("u1"))
    assert isinstance(again, m.Deny)
    assert again.durable


def test_denial_record_prunes_pods_that_are_gone(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    effects = d.list(pod("u1"), denials={"u1": "x", "gone": "y"})
    (prune,) = [e for e in effects if isinstance(e, m.PruneDenials)]
    assert prune.uids == {"gone"}


# --- pods running without a grant ---------------------------------------------------------------------


def test_ungated_pod_that_is_denied_is_evicted_with_events(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    effects = d.list(pod(gated=False))
    assert kinds(effects) == ["Register", "PostEvent"]
    assert events(effects) == [("Pod", "NotGated")]
    d.send(m.Registered("u1", m.Denied("CustomerNotEntitledException: no")))
    (evict,) = d.send(m.Written("u1", pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")))
    assert isinstance(evict, m.Evict)
    done = d.send(m.Evicted("u1", evict.pod, evict.reason))
    assert events(done) == [("Pod", "UngatedPodEvicted"), ("MeteredProduct", "UngatedPodEvicted")]
    assert d.send(m.PodUpdated(pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="3"))) == []


def test_gate_removed_from_a_denied_pod_gets_it_evicted(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod(notes={ANNOTATION_ENTITLEMENT: "Denied"}), denials={"u1": "CustomerNotEntitledException"})
    removed = pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="5")
    (evict,) = d.send(m.PodUpdated(removed))
    assert isinstance(evict, m.Evict)
    assert evict.reason == "CustomerNotEntitledException"


def test_report_mode_reports_once_and_never_evicts(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), ungated_action=UngatedPodAction.REPORT)
    d.list(pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}), denials={"u1": "NotEntitled"})
    assert events(d.effects) == [("Pod", "UngatedPodReported"), ("MeteredProduct", "UngatedPodReported")]
    assert d.send(m.PodUpdated(pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="9"))) == []
    assert not any(isinstance(e, m.Evict) for e in d.effects)


def test_ungated_pod_failing_for_good_is_evicted_but_throttling_is_waited_out(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod("t", gated=False), pod("e", gated=False))
    d.send(m.Registered("t", m.Failed("ThrottlingException: slow down", transient=True)))
    d.send(m.Written("t", pod("t", gated=False, rv="2")))
    assert not any(isinstance(e, m.Evict) for e in d.effects)
    d.send(m.Registered("e", m.Failed("MissingRoleArn: no role", transient=False)))
    (evict,) = d.send(m.Written("e", pod("e", gated=False, rv="2")))
    assert isinstance(evict, m.Evict)
    assert evict.reason.startswith("MissingRoleArn")


def test_eviction_blocked_by_a_disruption_budget_is_retried_on_the_backoff(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}), denials={"u1": "NotEntitled"})
    denied = pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"})
    too_many = "KubernetesApi429: Too Many Requests"
    (schedule,) = d.send(m.Evicted("u1", denied, "NotEntitled", too_many, transient=True))
    assert isinstance(schedule, m.Schedule)
    assert d.send(m.Due("u1")) == []  # not yet
    d.now = schedule.at
    assert kinds(d.send(m.Due("u1"))) == ["Evict"]


# --- retries: one backoff, scheduled, never slept -----------------------------------------------------


def test_throttled_pod_is_retried_on_a_timer_with_a_growing_bounded_delay(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod())
    delays = []
    for attempt in range(1, 12):
        effects = d.send(m.Registered("u1", m.Failed("ThrottlingException: x", transient=True)))
        (schedule,) = [e for e in effects if isinstance(e, m.Schedule)]
        delay = (schedule.at - d.now).total_seconds()
        ceiling = m.BACKOFF.ceiling(attempt - 1)
        assert 0 <= delay <= ceiling
        delays.append(delay)
        if attempt == 1:
            assert [type(e).__name__ for e in effects] == ["Schedule", "WriteState"]
            d.send(m.Written("u1", pod(notes={ANNOTATION_ENTITLEMENT: "Pending"}, rv=str(attempt + 1))))
        if delay > 0:
            assert d.send(m.Due("u1")) == []  # an early timer does nothing
        d.now = schedule.at
        assert kinds(d.send(m.Due("u1"))) == ["Register"]
    assert max(delays) <= m.BACKOFF.cap
    assert d.record().attempts == 11
    # Only the first Pending is written: the same reason again is not another pod write.
    assert kinds(d.effects).count("WriteState") == 1


def test_jitter_spreads_pods_throttled_together_and_is_deterministic() -> None:
    policy = m.GatePolicy()
    at = [machine.backoff_at(policy, f"pod-{i}", 4, T0) for i in range(50)]
    assert len(set(at)) > 40
    assert at == [machine.backoff_at(policy, f"pod-{i}", 4, T0) for i in range(50)]


def test_in_flight_registrations_per_product_are_capped_and_refilled(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), max_inflight=4)
    effects = d.list(*[pod(f"p{i}") for i in range(10)])
    assert kinds(effects).count("Register") == 4
    assert d.state.inflight == 4
    refill = d.send(m.Registered("p0", m.Failed("ThrottlingException: x", transient=True)))
    assert kinds(refill).count("Register") == 1
    assert d.state.inflight == 4
    d.send(m.PodDeleted("p1"))
    assert d.state.inflight == 4
    assert kinds(d.effects).count("Register") == 6


def test_error_waits_and_a_spec_change_retries_at_once(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod())
    effects = d.send(m.Registered("u1", m.Failed("MissingRoleArn: none", transient=False)))
    assert ("Pod", "EntitlementError") in events(effects)
    d.send(m.Written("u1", pod(notes={ANNOTATION_ENTITLEMENT: "Error"}, rv="2")))
    assert d.record().state is EntitlementState.ERROR
    assert kinds(d.send(m.ProductChanged(info(key, generation=2)))) == ["Register"]


def test_stale_results_and_timers_are_ignored(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod())
    d.send(m.PodDeleted("u1"))
    assert d.send(m.Registered("u1", m.Granted("t", T0))) == []
    assert d.send(m.Due("u1")) == []
    assert d.state.inflight == 0


# --- audit ---------------------------------------------------------------------------------------------


def test_audit_denial_releases_the_gate_and_never_evicts(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key, mode="Audit"))
    d.list(pod("g", gated=True), pod("r", gated=False))
    (deny,) = d.send(m.Registered("g", m.Denied("CustomerNotEntitledException: no")))
    assert isinstance(deny, m.Deny)
    assert deny.release
    d.send(m.Registered("r", m.Denied("CustomerNotEntitledException: no")))
    d.send(m.Written("r", pod("r", gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")))
    assert not any(isinstance(e, m.Evict) for e in d.effects)
    assert not any(r == ("Pod", "NotGated") for r in events(d.effects))


# --- scope Cluster -------------------------------------------------------------------------------------


def registration(key: rsa.RSAPrivateKey, nonce: str, iat: datetime, **kw: Any) -> dict[str, Any]:
    return Registration(
        state=kw.pop("state", EntitlementState.GRANTED),
        nonce=kw.pop("stated_nonce", nonce),
        signature=sign(key, nonce, iat),
        registered_at=kw.pop("registered_at", iat),
        attempts=1,
    ).to_kube()


def test_restore_accepts_only_a_fresh_grant_for_this_clusters_kube_system_uid(key: rsa.RSAPrivateKey) -> None:
    product_key = info(key, scope="Cluster").product_key()
    fresh = registration(key, KUBE_SYSTEM, T0 - timedelta(minutes=10))
    restored = cluster_scope.restore(fresh, product_key, KUBE_SYSTEM, T0)
    assert restored is not None
    assert restored.state is EntitlementState.GRANTED
    # Renewal is bounded by the signed iat: 50 minutes from now, whatever the status says.
    assert restored.renew_at == T0 + timedelta(minutes=50)


@pytest.mark.parametrize(
    "case",
    [
        "another pod's uid as nonce (status claims it)",
        "another cluster's uid",
        "signed in 2020, registeredAt says now",
        "iat in the future",
        "signature by another key",
        "state Pending",
    ],
)
def test_restore_refuses_anything_it_cannot_prove(key: rsa.RSAPrivateKey, case: str) -> None:
    product_key = info(key, scope="Cluster").product_key()
    now = T0
    stored: dict[str, Any]
    if case.startswith("another pod"):
        stored = registration(key, "some-pod-uid", now)
    elif case.startswith("another cluster"):
        stored = registration(key, "other-cluster", now)
    elif case.startswith("signed in 2020"):
        stored = registration(key, KUBE_SYSTEM, datetime(2020, 1, 1, tzinfo=UTC), registered_at=now)
    elif case.startswith("iat in the future"):
        stored = registration(key, KUBE_SYSTEM, now + timedelta(days=365))
    elif case.startswith("signature by another"):
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        stored = registration(other, KUBE_SYSTEM, now)
    else:
        stored = registration(key, KUBE_SYSTEM, now, state=EntitlementState.PENDING)
    if case.startswith("another pod"):
        stored["nonce"] = KUBE_SYSTEM  # the status says the right nonce; the signature does not
    assert cluster_scope.restore(stored, product_key, KUBE_SYSTEM, now) is None


def test_restored_denial_needs_this_clusters_nonce(key: rsa.RSAPrivateKey) -> None:
    product_key = info(key, scope="Cluster").product_key()
    denied = {"state": "Denied", "nonce": KUBE_SYSTEM, "attempts": 1, "lastError": "CustomerNotEntitled"}
    restored = cluster_scope.restore(denied, product_key, KUBE_SYSTEM, T0)
    assert restored is not None
    assert restored.state is EntitlementState.DENIED
    assert cluster_scope.restore({**denied, "nonce": "x"}, product_key, KUBE_SYSTEM, T0) is None


def test_cluster_scope_releases_pods_on_the_one_registration_and_renews_it(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key, scope="Cluster"))
    (register,) = d.effects
    assert isinstance(register, m.RegisterCluster)
    assert register.previous is None
    assert d.list(pod("a"), pod("b")) == []  # nothing before the cluster registration answers
    verified = info(key, scope="Cluster").product_key().verify(sign(key, KUBE_SYSTEM, T0), KUBE_SYSTEM)
    effects = d.send(m.ClusterDone(cluster_scope.granted(verified, KUBE_SYSTEM, 1, T0)))
    assert kinds(effects).count("WriteGrant") == 2
    (renew,) = [e for e in effects if isinstance(e, m.Schedule)]
    assert renew.at == T0 + timedelta(seconds=cluster_scope.RENEW_SECONDS)
    d.now = renew.at
    assert kinds(d.send(m.Due(m.CLUSTER))) == ["RegisterCluster"]


def test_cluster_denial_denies_every_pod_and_evicts_the_ungated(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key, scope="Cluster"))
    d.list(pod("a"), pod("b", gated=False))
    effects = d.send(m.ClusterDone(cluster_scope.denied(KUBE_SYSTEM, "CustomerNotEntitledException: no", 1)))
    assert kinds(effects).count("Deny") == 2
    d.send(m.Written("b", pod("b", gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")))
    assert any(isinstance(e, m.Evict) and e.pod["metadata"]["uid"] == "b" for e in d.effects)


def test_cluster_failure_retries_on_the_same_backoff(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key, scope="Cluster"))
    failed = cluster_scope.failed(None, "ThrottlingException: x", True, 1)
    (schedule, *_) = d.send(m.ClusterDone(failed, transient=True))
    assert isinstance(schedule, m.Schedule)
    assert schedule.key == m.CLUSTER
    assert schedule.at <= T0 + timedelta(seconds=m.BACKOFF.ceiling(0))


def test_held_gauge_counts_by_state(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod("w"), pod("d"), pod("r", gated=False))
    d.send(m.Registered("d", m.Denied("CustomerNotEntitledException: no")))
    assert d.state.held() == {"waiting": 1, "Pending": 0, "Denied": 1, "Error": 0}


def test_unchanged_product_does_not_reset(key: rsa.RSAPrivateKey) -> None:
    product = info(key)
    d = Driver(product)
    d.list(pod())
    d.send(m.Registered("u1", m.Failed("MissingRoleArn: x", transient=False)))
    assert d.send(m.ProductChanged(replace(product))) == []


def test_owning_workload_is_looked_up_once_per_pod(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    owned = pod("o", notes={ANNOTATION_SIGNATURE: sign(key, "o")}, gated=False)
    owned["metadata"]["ownerReferences"] = [
        {"kind": "ReplicaSet", "name": "rs", "uid": "r", "controller": True}
    ]
    effects = d.list(owned, pod("bare"))
    (find,) = [e for e in effects if isinstance(e, m.FindWorkload)]
    assert find.pod["metadata"]["uid"] == "o"
    ref = WorkloadRef("Deployment", "shop", "web", "d")
    d.send(m.WorkloadFound("o", ref))
    assert not [e for e in d.send(m.PodUpdated(owned)) if isinstance(e, m.FindWorkload)]
    members = machine.workload_members(d.state)
    assert [v.state for v in members[ref]] == [EntitlementState.GRANTED]


def test_eviction_events_do_not_depend_on_the_deletion_arriving_last(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    running = pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"})
    (evict,) = d.list(running, denials={"u1": "NotEntitled"})
    assert isinstance(evict, m.Evict)
    d.send(m.PodDeleted("u1"))  # the watch saw the deletion before the worker answered
    done = d.send(m.Evicted("u1", evict.pod, evict.reason))
    assert events(done) == [("Pod", "UngatedPodEvicted"), ("MeteredProduct", "UngatedPodEvicted")]
    # A pod that was gone already was not evicted by the operator: no Event says so.
    assert d.send(m.Evicted("u1", evict.pod, evict.reason, gone=True)) == []


def test_a_change_seen_by_the_watch_is_not_hidden_by_a_late_write_answer(key: rsa.RSAPrivateKey) -> None:
    """The buyer removes the gate while the denial's write is still answering: still evicted."""
    d = Driver(info(key))
    d.list(pod(rv="1"))
    d.send(m.Registered("u1", m.Denied("CustomerNotEntitledException: no")))
    # The watch delivers the denial annotation (rv 2), then the buyer's gate removal (rv 3) ...
    denied = pod(notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")
    d.send(m.PodUpdated(denied))
    assert d.send(m.PodUpdated(pod(gated=False, notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="3"))) == []
    # ... before the worker answers with the pod as its write left it (rv 2).
    (evict,) = d.send(m.Written("u1", denied))
    assert isinstance(evict, m.Evict)


# --- spec.metering.onFailure: MeteringHold -------------------------------------------------------------

HOLD = Hold("MeteringFailing: usage of shop/paid could not be reported for 3 hour(s) or more")


def test_a_hold_keeps_a_new_pod_gated_unregistered_and_says_why_once(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list()
    # No pods yet: the product is told, nothing else.
    assert events(d.send(m.MeteringHold(HOLD))) == [("MeteredProduct", "NewPodsHeld")]
    effects = d.send(m.PodUpdated(pod("u1")))
    assert kinds(effects) == ["WriteState", "PostEvent", "PostEvent"]
    write = effects[0]
    assert isinstance(write, m.WriteState)
    assert (write.state, write.reason, write.release) == (EntitlementState.PENDING, HOLD.reason, False)
    assert events(effects) == [("Pod", "PodHeld"), ("MeteredProduct", "PodHeld")]
    assert all(HOLD.reason in e.message for e in effects if isinstance(e, m.PostEvent))
    # The write answers; later observations and timers change nothing while the hold lasts.
    assert d.send(m.Written("u1", pod("u1", rv="2"))) == []
    assert d.send(m.PodUpdated(pod("u1", rv="3"))) == []
    assert d.send(m.MeteringHold(HOLD)) == []
    assert "Register" not in kinds(d.effects)


def test_lifting_the_hold_registers_and_releases_the_held_pod(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.send(m.MeteringHold(HOLD))
    d.list(pod("u1"))
    d.send(m.Written("u1", pod("u1", rv="2")))
    lifted = d.send(m.MeteringHold(None))
    assert kinds(lifted) == ["PostEvent", "Register"]
    assert events(lifted) == [("MeteredProduct", "NewPodsReleased")]
    assert d.record().held is None
    (grant,) = d.send(m.Registered("u1", m.Granted(sign(key, "u1"), T0)))
    assert isinstance(grant, m.WriteGrant)


def test_a_pod_granted_while_the_hold_starts_is_not_released_until_it_lifts(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    assert kinds(d.list(pod("u1"))) == ["Register"]
    d.send(m.MeteringHold(HOLD))  # the registration is in flight: nothing to do yet
    effects = d.send(m.Registered("u1", m.Granted(sign(key, "u1"), T0)))
    assert kinds(effects) == ["WriteState", "PostEvent", "PostEvent"]  # held, not WriteGrant
    d.send(m.Written("u1", pod("u1", rv="2")))
    (_, grant) = d.send(m.MeteringHold(None))
    assert isinstance(grant, m.WriteGrant)  # the proof was kept: no second RegisterUsage


def test_running_pods_keep_running_under_hold_new_pods(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    token = sign(key, "u1")
    running = pod("u1", gated=False, notes={ANNOTATION_SIGNATURE: token, ANNOTATION_ENTITLEMENT: "Granted"})
    assert d.list(running) == []
    assert kinds(d.send(m.MeteringHold(HOLD))) == ["PostEvent"]  # NewPodsHeld, nothing for the pod
    assert d.record().state is EntitlementState.GRANTED


def test_evict_evicts_running_pods_once_each_and_holds_new_ones(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    token = sign(key, "u1")
    running = pod("u1", gated=False, notes={ANNOTATION_SIGNATURE: token, ANNOTATION_ENTITLEMENT: "Granted"})
    d.list(running, pod("u2"))
    token2 = sign(key, "u2")
    d.send(m.Registered("u2", m.Granted(token2, T0)))
    d.send(m.Written("u2", pod("u2", gated=False, notes={ANNOTATION_SIGNATURE: token2}, rv="2")))
    evict_hold = replace(HOLD, evict=True)
    effects = d.send(m.MeteringHold(evict_hold))
    evictions = [e for e in effects if isinstance(e, m.Evict)]
    assert sorted(e.pod["metadata"]["uid"] for e in evictions) == ["u1", "u2"]
    assert all(e.cause == "metering" and e.reason == HOLD.reason for e in evictions)
    done = d.send(m.Evicted("u1", running, HOLD.reason, cause="metering"))
    assert events(done) == [("Pod", "MeteringFailureEvicted"), ("MeteredProduct", "MeteringFailureEvicted")]
    assert d.send(m.PodUpdated(running)) == []  # evicted once, not again
    # A PodDisruptionBudget refusing (429) is retried on the backoff.
    refused = d.send(
        m.Evicted("u2", pod("u2", gated=False), HOLD.reason, "KubernetesApi429", True, cause="metering")
    )
    assert kinds(refused) == ["Schedule"]
    # The replacement pod is new: it is held.
    assert kinds(d.send(m.PodUpdated(pod("u3")))) == ["WriteState", "PostEvent", "PostEvent"]


def test_a_hold_is_ignored_in_audit_mode(key: rsa.RSAPrivateKey) -> None:
    """Audit never holds a pod (the CRD refuses HoldNewPods/Evict outside Enforce anyway)."""
    d = Driver(info(key, mode="Audit"))
    d.send(m.MeteringHold(replace(HOLD, evict=True)))
    assert kinds(d.list(pod("u1"))) == ["Register"]
    assert events(d.effects) == []


def test_a_denied_pod_stays_denied_under_a_hold(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key))
    d.list(pod("u1"), denials={"u1": "CustomerNotEntitledException: no"})
    d.send(m.Written("u1", pod("u1", notes={ANNOTATION_ENTITLEMENT: "Denied"}, rv="2")))
    d.effects.clear()
    d.send(m.MeteringHold(HOLD))
    assert events(d.effects) == [("MeteredProduct", "NewPodsHeld")]
    assert d.record().state is EntitlementState.DENIED
