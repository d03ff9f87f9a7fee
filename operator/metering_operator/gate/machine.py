"""The per-product entitlement gate as a pure state machine.

``step(state, message, now) -> (state, effects)``: no I/O, no clock of its own, no randomness
(the backoff's jitter is derived from the pod's uid and attempt), so every rule is unit-tested by
feeding messages with a fake clock (``tests/unit/test_gate_machine.py``). The controller
(:mod:`metering_operator.gate.controller`) feeds it what the API server and the workers say and
carries out the effects it returns (:mod:`metering_operator.gate.effects`).

One :class:`PodRecord` per pod holds everything the gate knows about it. The rules:

* **Only proof grants.** A pod is granted when RegisterUsage answered with a signature that
  verified for the pod's own uid (``Registered(Granted)``), or when its ``signature`` annotation
  verifies for its own uid (a grant the operator wrote before a restart). Nothing else the pod
  says -- ``entitlement: Granted``, ``Denied``, ``Pending``, a copied signature -- is read as a
  decision: such a pod is registered like any other. Only a granted pod's gate is removed.
* **Denials are the operator's own record** (:class:`Listed` carries them from the operator's
  ConfigMap, :mod:`metering_operator.kube.records`), written before the pod's annotation; a
  denied pod is never registered again and, in Enforce, never released.
* **A pod running without a grant** (no gate: policies not installed, webhook down, created
  before the product, gate removed by someone else) whose registration is denied, or fails for a
  reason other than throttling, is evicted in Enforce (or only reported, per
  :class:`~metering_operator.domain.entitlement.UngatedPodAction`), with Events on the pod and
  the product.
* **One backoff** for every retry (AWS throttling and errors, failed pod writes and evictions,
  scope Cluster), as timers (:class:`Schedule` effects): nothing sleeps in a worker.
* **At most** ``max_inflight`` RegisterUsage calls per product at once, so one product's burst or
  throttling never fills the shared AWS pool and another product's pod is registered at once.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta
from typing import assert_never

from metering_operator.domain import entitlement as ent
from metering_operator.domain.product import SCHEDULING_GATE, EntitlementMode, EntitlementState
from metering_operator.gate.model import (
    CLUSTER,
    Busy,
    ClusterDone,
    Denied,
    Deny,
    Due,
    Effect,
    EventType,
    Evict,
    Evicted,
    Failed,
    FindWorkload,
    GatePolicy,
    GateState,
    Granted,
    Listed,
    Message,
    Pod,
    PodDeleted,
    PodRecord,
    PodUpdated,
    PostEvent,
    ProductChanged,
    Proof,
    PruneDenials,
    Register,
    RegisterCluster,
    Registered,
    Schedule,
    Step,
    Vanished,
    WorkloadFound,
    WriteGrant,
    WriteState,
    Written,
)
from metering_operator.gate.product import ProductInfo
from metering_operator.kube.pods import WorkloadRef, object_ref

# --- the step ----------------------------------------------------------------------------------------


def step(state: GateState, message: Message, now: datetime) -> Step:
    """The gate's one transition function."""
    effects: list[Effect] = []
    if isinstance(message, ProductChanged):
        state = _product_changed(state, message.info)
        return _consider_all(state, now, effects)
    if isinstance(message, Listed):
        return _listed(state, message, now)
    if isinstance(message, PodUpdated):
        uid = str(message.pod["metadata"]["uid"])
        record = state.pods.get(uid) or PodRecord(uid, message.pod)
        record = _find_owner(_observe(state, record, message.pod), effects)
        return _consider_one(state, record, now, effects)
    if isinstance(message, WorkloadFound):
        found = state.pods.get(message.uid)
        if found is None or message.workload is None:
            return state, effects
        pods = dict(state.pods)
        pods[message.uid] = replace(found, workload=message.workload)
        return replace(state, pods=pods), effects
    if isinstance(message, PodDeleted):
        gone = state.pods.get(message.uid)
        if gone is None:
            return state, effects
        pods = dict(state.pods)
        del pods[message.uid]
        inflight = state.inflight - (1 if gone.busy is Busy.REGISTER else 0)
        return _dispatch_queued(replace(state, pods=pods, inflight=inflight), now, effects)
    if isinstance(message, Due):
        if message.key == CLUSTER:
            return _consider_all(state, now, effects)
        due = state.pods.get(message.key)
        if due is None or due.retry_at is None or due.retry_at > now:
            return state, effects  # a stale timer (the pod moved on)
        return _consider_one(state, due, now, effects)
    if isinstance(message, Registered):
        return _registered(state, message, now)
    if isinstance(message, Written):
        return _written(state, message, now)
    if isinstance(message, Evicted):
        return _evicted(state, message, now)
    if isinstance(message, ClusterDone):
        return _cluster_done(state, message, now)
    assert_never(message)  # mypy proves every message is handled


def backoff_at(policy: GatePolicy, key: str, attempts: int, now: datetime) -> datetime:
    """When failed attempt number ``attempts`` (1-based) of ``key`` is retried.

    Full jitter drawn from a hash of key and attempt: pods throttled together spread out, and the
    step stays a pure function."""
    digest = hashlib.sha256(f"{key}:{attempts}".encode()).digest()
    draw = int.from_bytes(digest[:4], "big") / 2**32
    delay = policy.backoff.delay(max(0, attempts - 1), rng=lambda: draw)
    return now + timedelta(seconds=delay)


# --- product and lists -------------------------------------------------------------------------------


def _product_changed(state: GateState, info: ProductInfo | None) -> GateState:
    previous = state.info
    pods = state.pods
    cluster = state.cluster
    cluster_attempts = state.cluster_attempts
    if info is not None and previous is not None and info.generation != previous.generation:
        # A changed spec (new key, mode, code) deserves a fresh look at waiting pods.
        pods = {
            uid: replace(r, attempts=0, retry_at=None) if r.granted is None and r.denied is None else r
            for uid, r in pods.items()
        }
        if (
            previous.spec.product_code != info.spec.product_code
            or previous.spec.public_key_version != info.spec.public_key_version
            or previous.spec.entitlement.scope != info.spec.entitlement.scope
        ):
            cluster, cluster_attempts = None, 0
    if info is not None and (previous is None or previous.public_key is not info.public_key):
        # A new key: annotation signatures are judged again with it.
        pods = {uid: replace(r, judged_token=None) for uid, r in pods.items()}
        pods = {uid: _observe(replace(state, info=info), r, r.pod) for uid, r in pods.items()}
    return replace(state, info=info, pods=pods, cluster=cluster, cluster_attempts=cluster_attempts)


def _listed(state: GateState, message: Listed, now: datetime) -> Step:
    effects: list[Effect] = []
    pods: dict[str, PodRecord] = {}
    inflight = 0
    for pod in message.pods:
        uid = str(pod["metadata"]["uid"])
        record = state.pods.get(uid) or PodRecord(uid, pod)
        if record.granted is None and record.denied is None and uid in message.denials:
            record = replace(record, denied=message.denials[uid], waiting=None)
        record = _find_owner(_observe(state, record, pod), effects)
        pods[uid] = record
        inflight += 1 if record.busy is Busy.REGISTER else 0
    state = replace(state, pods=pods, listed=True, inflight=inflight)
    stale = frozenset(message.denials) - frozenset(pods)
    if stale and state.info is not None:
        effects.append(PruneDenials(state.info, stale))
    return _consider_all(state, now, effects)


def _find_owner(record: PodRecord, effects: list[Effect]) -> PodRecord:
    """Once per pod with a controlling owner: find its workload, so its summary counts every pod
    (also those proven after a restart, which see no write)."""
    if record.owner_looked_up or record.workload is not None:
        return record
    owners = record.pod.get("metadata", {}).get("ownerReferences") or []
    if any(ref.get("controller") for ref in owners):
        effects.append(FindWorkload(record.pod))
    return replace(record, owner_looked_up=True)


def _observe(state: GateState, record: PodRecord, pod: Pod) -> PodRecord:
    """Take the pod's newest version; judge a new ``signature`` annotation (proof or nothing)."""
    record = replace(record, pod=pod)
    info = state.info
    token = ent.annotated_signature(pod)
    if (
        record.granted is not None
        or record.denied is not None
        or info is None
        or info.public_key is None
        or info.cluster_scope  # the cluster registration is the proof there
        or not token
        or token == record.judged_token
    ):
        return record
    verified = ent.proven_grant(pod, info.product_key())
    record = replace(record, judged_token=token)
    if verified is None:
        return record
    return replace(record, granted=Proof(verified.token, verified.issued_at), waiting=None, reason="")


# --- deciding ----------------------------------------------------------------------------------------


def _consider_all(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    state, effects = _ensure_cluster(state, now, effects)
    pods = dict(state.pods)
    for uid in list(pods):
        state = replace(state, pods=pods)
        record, more, inflight = _consider(state, pods[uid], now)
        pods[uid] = record
        state = replace(state, pods=pods, inflight=inflight)
        effects.extend(more)
    return replace(state, pods=pods), effects


def _consider_one(state: GateState, record: PodRecord, now: datetime, effects: list[Effect]) -> Step:
    record, more, inflight = _consider(state, record, now)
    pods = dict(state.pods)
    pods[record.uid] = record
    effects.extend(more)
    return replace(state, pods=pods, inflight=inflight), effects


def _dispatch_queued(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    """A registration slot freed up: start the pods that were waiting for one, oldest first."""
    if state.inflight >= state.policy.max_inflight:
        return state, effects
    pods = dict(state.pods)
    for uid, record in pods.items():
        if state.inflight >= state.policy.max_inflight:
            break
        if record.busy is not None or record.granted or record.denied is not None:
            continue
        if record.retry_at is not None and record.retry_at > now:
            continue
        record, more, inflight = _consider(state, record, now)
        pods[uid] = record
        state = replace(state, pods=pods, inflight=inflight)
        effects.extend(more)
    return state, effects


def _consider(state: GateState, record: PodRecord, now: datetime) -> tuple[PodRecord, list[Effect], int]:
    """What to do with one pod now: (its record, effects, the product's in-flight registrations)."""
    info = state.info
    inflight = state.inflight
    pod = record.pod
    if info is None or not info.active or not state.listed or record.busy is not None:
        return record, [], inflight
    if ent.is_terminating(pod):
        return record, [], inflight
    gated = ent.is_gated(pod)
    enforce = info.mode is EntitlementMode.ENFORCE
    audit = info.mode is EntitlementMode.AUDIT
    if record.retry_at is not None and record.retry_at > now:
        if enforce and not gated and record.waiting is EntitlementState.ERROR:
            return _act_on_ungated(state, record, info, record.reason)
        return record, [], inflight
    record = replace(record, retry_at=None)

    if record.granted is not None:
        # Proven: make sure the pod says so and is released (one patch, only when needed).
        if gated or ent.annotated_signature(pod) != record.granted.token:
            return replace(record, busy=Busy.WRITE), [WriteGrant(pod, info, record.granted, now)], inflight
        return record, [], inflight

    if record.denied is not None:
        if not record.recorded:
            # The denial is not in the operator's record yet (that write failed): again, record first.
            deny = Deny(pod, info, record.denied, release=audit and gated, durable=True, at=now)
            return replace(record, busy=Busy.WRITE), [deny], inflight
        if audit and gated:
            release = WriteState(pod, info, EntitlementState.DENIED, record.denied, release=True)
            return replace(record, busy=Busy.WRITE), [release], inflight
        if enforce and not gated:
            return _act_on_ungated(state, record, info, record.denied)
        if ent.entitlement_state(pod) is not EntitlementState.DENIED:
            # The record says Denied, the pod no longer does (a restart, or someone erased it).
            rewrite = WriteState(pod, info, EntitlementState.DENIED, record.denied)
            return replace(record, busy=Busy.WRITE), [rewrite], inflight
        return record, [], inflight

    if info.cluster_scope:
        cluster = state.cluster
        if cluster is None or not cluster.settled:
            return record, [], inflight  # decided when the cluster registration answers
        if cluster.state is EntitlementState.GRANTED:
            issued = cluster.verified.issued_at if cluster.verified else None
            proof = Proof(cluster.token, issued)
            token = ent.annotated_signature(pod)
            if token and token != cluster.token and cluster.record.nonce:
                # A pod granted on an earlier registration of this cluster keeps its proof: it
                # verifies for the kube-system uid too, so it is not rewritten on every renewal.
                earlier = ent.proven_grant(pod, info.product_key(), nonce=cluster.record.nonce)
                if earlier is not None:
                    proof = Proof(earlier.token, earlier.issued_at)
            record = replace(record, granted=proof, waiting=None, reason="")
            return _consider(state, record, now)
        record = replace(record, denied=cluster.reason or "Denied", waiting=None)
        effect = Deny(pod, info, record.denied or "", release=audit and gated, durable=False, at=now)
        return replace(record, busy=Busy.WRITE), [effect], inflight

    if inflight >= state.policy.max_inflight:
        return record, [], inflight  # queued: started when a slot frees up
    effects: list[Effect] = [Register(pod, info)]
    if enforce and not gated and not record.ungated:
        record = replace(record, ungated=True)
        effects.append(
            PostEvent(
                object_ref(pod, "Pod", "v1"),
                "Warning",
                "NotGated",
                f"pod runs without the {SCHEDULING_GATE} gate and without a verified grant; "
                f"registering it for {info.key} now (denied: "
                + (
                    "it is evicted)"
                    if state.policy.ungated_action is ent.UngatedPodAction.EVICT
                    else "it is reported)"
                ),
            )
        )
    return replace(record, busy=Busy.REGISTER), effects, inflight + 1


def _act_on_ungated(
    state: GateState, record: PodRecord, info: ProductInfo, reason: str
) -> tuple[PodRecord, list[Effect], int]:
    """An Enforce pod runs without a grant and is denied (or fails for good): evict or report."""
    if record.acted:
        return record, [], state.inflight
    record = replace(record, ungated=True)
    if state.policy.ungated_action is ent.UngatedPodAction.EVICT:
        return replace(record, busy=Busy.EVICT), [Evict(record.pod, info, reason)], state.inflight
    message = (
        f"pod {record.name} runs without a verified grant for {info.key} ({reason}); "
        "--ungated-pod-action=Report: not evicted"
    )
    return (
        replace(record, acted=True),
        [
            PostEvent(object_ref(record.pod, "Pod", "v1"), "Warning", "UngatedPodReported", message),
            PostEvent(info.ref(), "Warning", "UngatedPodReported", message),
        ],
        state.inflight,
    )


# --- results -----------------------------------------------------------------------------------------


def _registered(state: GateState, message: Registered, now: datetime) -> Step:
    effects: list[Effect] = []
    record = state.pods.get(message.uid)
    if record is None or record.busy is not Busy.REGISTER:
        return state, effects  # forgotten meanwhile (deleted, or a new list): its slot is free already
    inflight = max(0, state.inflight - 1)
    record = replace(record, busy=None)
    state = replace(state, inflight=inflight)
    info = state.info
    result = message.result
    if isinstance(result, Granted):
        record = replace(
            record, granted=Proof(result.token, result.issued_at), attempts=0, waiting=None, reason=""
        )
    elif isinstance(result, Denied) and info is not None:
        record = replace(record, denied=result.reason, recorded=False, waiting=None, reason=result.reason)
        release = info.mode is EntitlementMode.AUDIT and ent.is_gated(record.pod)
        record = replace(record, busy=Busy.WRITE)
        effects.append(Deny(record.pod, info, result.reason, release=release, durable=True, at=now))
        state = replace(state, last_denial=result.reason)
    elif isinstance(result, Failed) and info is not None:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        waiting = EntitlementState.PENDING if result.transient else EntitlementState.ERROR
        changed = (waiting, result.reason) != (record.waiting, record.reason)
        record = replace(record, attempts=attempts, retry_at=retry_at, waiting=waiting, reason=result.reason)
        effects.append(Schedule(retry_at, record.uid))
        audit = info.mode is EntitlementMode.AUDIT
        if changed or (audit and ent.is_gated(record.pod)):
            record = replace(record, busy=Busy.WRITE)
            effects.append(
                WriteState(
                    record.pod, info, waiting, result.reason, release=audit and ent.is_gated(record.pod)
                )
            )
        if changed and not result.transient:
            effects.append(
                PostEvent(
                    object_ref(record.pod, "Pod", "v1"),
                    "Warning",
                    "EntitlementError",
                    f"registration for {info.key} failed: {result.reason}"
                    + ("" if audit else "; the pod gets no grant and is retried later"),
                )
            )
        state = replace(state, last_error=result.reason)
    elif isinstance(result, Vanished):
        # Gone, or replaced under the same name: its deletion arrives from the watch; look again
        # later rather than at once, so a pod that keeps vanishing cannot spin.
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        record = replace(record, attempts=attempts, retry_at=retry_at)
        effects.append(Schedule(retry_at, record.uid))
    pods = dict(state.pods)
    pods[record.uid] = record
    state = replace(state, pods=pods)
    state, effects = _consider_one(state, record, now, effects)
    return _dispatch_queued(state, now, effects)


def _fresher(written: Pod, watched: Pod) -> bool:
    """Whether the pod as the write left it is newer than what the watch has shown since.

    The watch may already have delivered a later change (say, a buyer removing the gate) before
    the worker's answer arrives: going back to the written version would hide it. resourceVersions
    are etcd revisions, compared as numbers; anything else takes the written version."""
    a = str(written.get("metadata", {}).get("resourceVersion", ""))
    b = str(watched.get("metadata", {}).get("resourceVersion", ""))
    if a.isdigit() and b.isdigit():
        return int(a) > int(b)
    return True


def _written(state: GateState, message: Written, now: datetime) -> Step:
    effects: list[Effect] = []
    record = state.pods.get(message.uid)
    if record is None:
        return state, effects
    record = replace(record, busy=None, workload=message.workload or record.workload)
    if message.pod is not None and _fresher(message.pod, record.pod):
        record = _observe(state, record, message.pod)
    if message.error is not None:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        record = replace(record, attempts=attempts, retry_at=retry_at)
        effects.append(Schedule(retry_at, record.uid))
    else:
        record = replace(record, attempts=0 if record.granted is not None else record.attempts, recorded=True)
    return _consider_one(state, record, now, effects)


def _evicted(state: GateState, message: Evicted, now: datetime) -> Step:
    effects: list[Effect] = []
    info = state.info
    if info is None:
        return state, effects
    pod_ref = object_ref(message.pod, "Pod", "v1")
    name = pod_ref["name"]
    if message.error is None and not message.gone:
        text = f"pod {name} ran without a verified grant for {info.key} ({message.reason}): evicted"
        effects += [
            PostEvent(pod_ref, "Warning", "UngatedPodEvicted", text),
            PostEvent(info.ref(), "Warning", "UngatedPodEvicted", text),
        ]
    record = state.pods.get(message.uid)
    if record is None:
        return state, effects  # its deletion arrived first
    record = replace(record, busy=None)
    why = message.reason
    if message.error is None:
        record = replace(record, acted=True)
    elif message.transient:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        record = replace(record, attempts=attempts, retry_at=retry_at)
        effects.append(Schedule(retry_at, record.uid))
    else:
        record = replace(record, acted=True)
        text = (
            f"pod {record.name} runs without a verified grant for {info.key} ({why}); "
            f"eviction failed: {message.error}"
        )
        effects += [
            PostEvent(pod_ref, "Warning", "EvictionFailed", text),
            PostEvent(info.ref(), "Warning", "EvictionFailed", text),
        ]
    pods = dict(state.pods)
    pods[record.uid] = record
    return replace(state, pods=pods), effects


# --- scope Cluster -----------------------------------------------------------------------------------


def _ensure_cluster(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    info = state.info
    if info is None or not info.active or not info.cluster_scope or state.cluster_busy:
        return state, effects
    cluster = state.cluster
    if cluster is not None and not cluster.due(now):
        return state, effects
    effects.append(RegisterCluster(info, cluster, state.cluster_attempts + 1))
    return replace(state, cluster_busy=True), effects


def _cluster_done(state: GateState, message: ClusterDone, now: datetime) -> Step:
    effects: list[Effect] = []
    previous = state.cluster
    result = message.registration
    attempts = result.record.attempts
    if result.state in (EntitlementState.PENDING, EntitlementState.ERROR) or (
        result.state is EntitlementState.GRANTED and result.reason
    ):
        # A failed attempt (first one, or a renewal of a grant still valid): retry on the backoff.
        result = replace(result, renew_at=backoff_at(state.policy, CLUSTER, attempts, now))
    if result.renew_at is not None:
        effects.append(Schedule(result.renew_at, CLUSTER))
    state = replace(state, cluster=result, cluster_busy=False, cluster_attempts=attempts)
    info = state.info
    if info is not None and (previous is None or previous.state is not result.state):
        kind: EventType = "Normal" if result.state is EntitlementState.GRANTED else "Warning"
        effects.append(
            PostEvent(
                info.ref(),
                kind,
                f"ClusterRegistration{result.state.value}",
                f"cluster-scope RegisterUsage: {result.state.value}"
                + (f" ({result.reason})" if result.reason else ""),
            )
        )
    if result.state is EntitlementState.DENIED:
        state = replace(state, last_denial=result.reason)
    elif result.state is not EntitlementState.GRANTED:
        state = replace(state, last_error=result.reason)
    if result.settled:
        return _consider_all(state, now, effects)
    return state, effects


# --- views -------------------------------------------------------------------------------------------


def workload_members(state: GateState) -> dict[WorkloadRef, list[ent.MemberView]]:
    """Each known workload's pods, as the summary annotation reports them."""
    members: dict[WorkloadRef, list[ent.MemberView]] = {}
    for record in state.live():
        if record.workload is None:
            continue
        proof = record.granted
        members.setdefault(record.workload, []).append(
            ent.MemberView(record.state, proof.token if proof else None, proof.issued_at if proof else None)
        )
    return members
