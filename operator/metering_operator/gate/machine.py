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
* **onFailure holds** (:class:`MeteringHold`, Enforce only): while the product's usage could not
  be reported for ``spec.metering.onFailure.afterHours`` hours, a gated pod is neither registered
  nor released (one ``Pending`` write with the reason and a ``PodHeld`` Event on the pod and the
  product); pods already running keep running unless the action is ``Evict``, which evicts them
  once each through the Eviction API. When the hold lifts, held pods go on as if nothing happened.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import datetime, timedelta
from typing import assert_never

from metering_operator.domain import entitlement as ent
from metering_operator.domain.license_seats import (
    CLUSTER_HOLDER,
    HeldSeat,
    SeatAction,
    next_review,
    plan_seats,
)
from metering_operator.domain.product import SCHEDULING_GATE, EntitlementMode, EntitlementState
from metering_operator.gate.book import Book, StaleState
from metering_operator.gate.model import (
    CLUSTER,
    SEATS,
    SEATS_EXHAUSTED,
    Busy,
    Checkout,
    CheckoutCluster,
    ClusterDone,
    Denied,
    Deny,
    Due,
    Effect,
    EventType,
    Evict,
    Evicted,
    Exhausted,
    Failed,
    FindWorkload,
    ForgetSeat,
    GatePolicy,
    GateState,
    Granted,
    Listed,
    LoadSeats,
    Message,
    MeteringHold,
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
    RegisterResult,
    Schedule,
    Seat,
    SeatDone,
    SeatOp,
    SeatsLoaded,
    Step,
    Vanished,
    WorkloadFound,
    WriteGrant,
    WriteState,
    Written,
    evolve,
)
from metering_operator.gate.product import ProductInfo
from metering_operator.kube.pods import WorkloadRef, object_ref

# --- the step ----------------------------------------------------------------------------------------


def step(state: GateState, message: Message, now: datetime) -> Step:
    """The gate's one transition function.

    The state's pods and their indexes (its :class:`~metering_operator.gate.book.Book`) are
    updated in place, so a step costs O(log n) in the product's pods, not a copy of them: the
    state passed in is spent, and stepping it again raises :class:`StaleState`. A step that
    raises changes nothing (its changes are undone): the state passed in goes on."""
    book = state.book
    if state.version != book.version:
        raise StaleState("this gate state was stepped already: go on from the state step returned")
    book.begin()
    try:
        state, effects = _step(state, message, now)
        if state.info is not None and state.info.license is not None:
            # Contract products: after every change, bring the seats in line with the pods.
            state, effects = _review_seats(state, now, effects)
    except BaseException:
        book.rollback()  # a step that raises changes nothing (the state passed in goes on)
        raise
    book.commit()
    book.version += 1
    return evolve(state, version=book.version), effects


def _step(state: GateState, message: Message, now: datetime) -> Step:
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
        state.book.put(evolve(found, workload=message.workload))
        return state, effects
    if isinstance(message, PodDeleted):
        gone = state.book.remove(message.uid)
        if gone is None:
            return state, effects
        state.book.inflight -= 1 if gone.busy is Busy.REGISTER else 0
        return _dispatch_queued(state, now, effects)
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
    if isinstance(message, SeatsLoaded):
        return _seats_loaded(state, message, now)
    if isinstance(message, SeatDone):
        return _seat_done(state, message, now)
    if isinstance(message, MeteringHold):
        if message.hold == state.hold:
            return state, effects
        info = state.info
        if info is not None and info.mode is EntitlementMode.ENFORCE:
            # Said once per change on the product: the gate has seen the verdict and acts on it.
            if message.hold is not None:
                effects.append(PostEvent(info.ref(), "Warning", "NewPodsHeld", message.hold.reason))
            else:
                text = "usage is reported again: held pods of the product are registered and released"
                effects.append(PostEvent(info.ref(), "Normal", "NewPodsReleased", text))
        return _consider_all(evolve(state, hold=message.hold), now, effects)
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
    book = state.book
    cluster = state.cluster
    cluster_attempts = state.cluster_attempts
    if info is not None and previous is not None and info.generation != previous.generation:
        # A changed spec (new key, mode, code) deserves a fresh look at waiting pods.
        for r in list(book.pods.values()):
            if r.granted is None and r.denied is None:
                book.put(evolve(r, attempts=0, retry_at=None))
        if (
            previous.spec.product_code != info.spec.product_code
            or previous.spec.public_key_version != info.spec.public_key_version
            or previous.spec.entitlement.scope != info.spec.entitlement.scope
        ):
            cluster, cluster_attempts = None, 0
    if info is not None and (previous is None or previous.public_key is not info.public_key):
        # A new key: annotation signatures are judged again with it.
        judging = evolve(state, info=info)
        for r in list(book.pods.values()):
            book.put(_observe(judging, evolve(r, judged_token=None), r.pod))
    if info is not None and previous is not None and info.generation != previous.generation:
        # A changed contract spec may fix what License Manager refused for the product.
        state = evolve(state, seats_cluster_denied=None, seats_cluster_attempts=0, seats_cluster_retry=None)
    return evolve(state, info=info, cluster=cluster, cluster_attempts=cluster_attempts)


def _listed(state: GateState, message: Listed, now: datetime) -> Step:
    effects: list[Effect] = []
    book = state.book
    known = dict(book.pods)
    book.clear()  # the list's order is the pods' order from now on
    inflight = 0
    for pod in message.pods:
        uid = str(pod["metadata"]["uid"])
        record = known.get(uid) or PodRecord(uid, pod)
        if record.granted is None and record.denied is None and uid in message.denials:
            record = evolve(record, denied=message.denials[uid], waiting=None)
        record = _find_owner(_observe(state, record, pod), effects)
        book.put(record)
        inflight += 1 if record.busy is Busy.REGISTER else 0
    book.inflight = inflight
    state = evolve(state, listed=True)
    stale = frozenset(message.denials) - frozenset(book.pods)
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
    return evolve(record, owner_looked_up=True)


def _observe(state: GateState, record: PodRecord, pod: Pod) -> PodRecord:
    """Take the pod's newest version; judge a new ``signature`` annotation (proof or nothing)."""
    record = evolve(record, pod=pod)
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
    record = evolve(record, judged_token=token)
    if verified is None:
        return record
    return evolve(record, granted=Proof(verified.token, verified.issued_at), waiting=None, reason="")


# --- deciding ----------------------------------------------------------------------------------------


def _consider_all(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    state, effects = _ensure_cluster(state, now, effects)
    book = state.book
    for uid in list(book.pods):
        record, more, inflight = _consider(state, book.pods[uid], now)
        book.inflight = inflight
        book.put(record)
        effects.extend(more)
    return state, effects


def _consider_one(state: GateState, record: PodRecord, now: datetime, effects: list[Effect]) -> Step:
    record, more, inflight = _consider(state, record, now)
    state.book.inflight = inflight
    state.book.put(record)
    effects.extend(more)
    return state, effects


def _dispatch_queued(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    """A registration slot freed up: start the pods that were waiting for one, oldest first.

    The book's ready queue holds every idle pod neither granted nor denied without a pending retry
    (and, once their backoff has run out, those with one), in the pods' order: the pods a walk of
    the whole map would have looked at, in the same order. A pod looked at here and left idle was
    waiting for something other than a slot (a list, the product, a hold, the cluster's or the
    seats' answer); it leaves the queue until a message about it or a look at every pod puts it
    back (or, for a contract product, a new per-cluster seat), as only those change its answer."""
    book = state.book
    cap = state.policy.max_inflight
    if book.inflight >= cap:
        return state, effects
    book.promote_due(now)
    while book.inflight < cap:
        record = book.pop_ready()
        if record is None:
            break
        record, more, inflight = _consider(state, record, now)
        book.inflight = inflight
        book.put(record)
        book.park(record.uid)
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
    record = evolve(record, retry_at=None)

    hold = state.hold if enforce else None
    if hold is None and record.held is not None:
        record = evolve(record, held=None)
    if hold is not None and record.denied is None:
        if gated:
            return _hold(record, info, hold.reason, inflight)
        if hold.evict and not record.acted:
            evict = Evict(pod, info, hold.reason, cause="metering")
            return evolve(record, busy=Busy.EVICT), [evict], inflight

    if record.granted is not None:
        # Proven: make sure the pod says so and is released (one patch, only when needed).
        if gated or ent.annotated_signature(pod) != record.granted.token:
            return evolve(record, busy=Busy.WRITE), [WriteGrant(pod, info, record.granted, now)], inflight
        return record, [], inflight

    if record.denied is not None:
        if not record.recorded:
            # The denial is not in the operator's record yet (that write failed): again, record first.
            deny = Deny(pod, info, record.denied, release=audit and gated, durable=True, at=now)
            return evolve(record, busy=Busy.WRITE), [deny], inflight
        if audit and gated:
            release = WriteState(pod, info, EntitlementState.DENIED, record.denied, release=True)
            return evolve(record, busy=Busy.WRITE), [release], inflight
        if enforce and not gated:
            return _act_on_ungated(state, record, info, record.denied)
        if ent.entitlement_state(pod) is not EntitlementState.DENIED:
            # The record says Denied, the pod no longer does (a restart, or someone erased it).
            rewrite = WriteState(pod, info, EntitlementState.DENIED, record.denied)
            return evolve(record, busy=Busy.WRITE), [rewrite], inflight
        return record, [], inflight

    if info.license is not None:
        return _consider_license(state, record, now)

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
            record = evolve(record, granted=proof, waiting=None, reason="")
            return _consider(state, record, now)
        record = evolve(record, denied=cluster.reason or "Denied", waiting=None)
        effect = Deny(pod, info, record.denied or "", release=audit and gated, durable=False, at=now)
        return evolve(record, busy=Busy.WRITE), [effect], inflight

    if inflight >= state.policy.max_inflight:
        return record, [], inflight  # queued: started when a slot frees up
    effects: list[Effect] = [Register(pod, info)]
    if enforce and not gated and not record.ungated:
        record = evolve(record, ungated=True)
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
    return evolve(record, busy=Busy.REGISTER), effects, inflight + 1


def _hold(
    record: PodRecord, info: ProductInfo, reason: str, inflight: int
) -> tuple[PodRecord, list[Effect], int]:
    """onFailure: the gated pod stays gated, neither registered nor released; said once per hold."""
    if record.held == reason:
        return record, [], inflight
    text = f"pod {record.name} stays behind the {SCHEDULING_GATE} gate: {reason}"
    return (
        evolve(record, held=reason, busy=Busy.WRITE),
        [
            WriteState(record.pod, info, EntitlementState.PENDING, reason),
            PostEvent(object_ref(record.pod, "Pod", "v1"), "Warning", "PodHeld", text),
            PostEvent(info.ref(), "Warning", "PodHeld", text),
        ],
        inflight,
    )


def _act_on_ungated(
    state: GateState, record: PodRecord, info: ProductInfo, reason: str
) -> tuple[PodRecord, list[Effect], int]:
    """An Enforce pod runs without a grant and is denied (or fails for good): evict or report."""
    if record.acted:
        return record, [], state.inflight
    record = evolve(record, ungated=True)
    if state.policy.ungated_action is ent.UngatedPodAction.EVICT:
        return evolve(record, busy=Busy.EVICT), [Evict(record.pod, info, reason)], state.inflight
    message = (
        f"pod {record.name} runs without a verified grant for {info.key} ({reason}); "
        "--ungated-pod-action=Report: not evicted"
    )
    return (
        evolve(record, acted=True),
        [
            PostEvent(object_ref(record.pod, "Pod", "v1"), "Warning", "UngatedPodReported", message),
            PostEvent(info.ref(), "Warning", "UngatedPodReported", message),
        ],
        state.inflight,
    )


# --- results -----------------------------------------------------------------------------------------


def _registered(state: GateState, message: Registered, now: datetime) -> Step:
    effects: list[Effect] = []
    result = message.result
    if isinstance(result, Granted) and result.seat is not None:
        # The checkout is the operator's now, whatever became of the pod meanwhile (gone: the
        # seat review checks it in).
        state.book.set_seat(result.seat.holder, Seat(result.seat))
    if message.uid == CLUSTER_HOLDER:
        return _cluster_checked_out(state, result, now)
    if isinstance(result, Exhausted):
        known = state.seats.get(message.uid)
        if known is None or (known.held.lease is None and known.held.count < result.count):
            state.book.set_seat(message.uid, Seat(HeldSeat(message.uid, result.count)))
    record = state.pods.get(message.uid)
    if record is None or record.busy is not Busy.REGISTER:
        return state, effects  # forgotten meanwhile (deleted, or a new list): its slot is free already
    state.book.inflight = max(0, state.inflight - 1)
    record = evolve(record, busy=None)
    info = state.info
    if isinstance(result, Granted):
        record = evolve(
            record, granted=Proof(result.token, result.issued_at), attempts=0, waiting=None, reason=""
        )
    elif isinstance(result, Denied) and info is not None:
        record = evolve(record, denied=result.reason, recorded=False, waiting=None, reason=result.reason)
        release = info.mode is EntitlementMode.AUDIT and ent.is_gated(record.pod)
        record = evolve(record, busy=Busy.WRITE)
        effects.append(Deny(record.pod, info, result.reason, release=release, durable=True, at=now))
        state = evolve(state, last_denial=result.reason)
    elif isinstance(result, Failed) and info is not None:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        waiting = EntitlementState.PENDING if result.transient else EntitlementState.ERROR
        changed = (waiting, result.reason) != (record.waiting, record.reason)
        record = evolve(record, attempts=attempts, retry_at=retry_at, waiting=waiting, reason=result.reason)
        effects.append(Schedule(retry_at, record.uid))
        audit = info.mode is EntitlementMode.AUDIT
        if changed or (audit and ent.is_gated(record.pod)):
            record = evolve(record, busy=Busy.WRITE)
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
        state = evolve(state, last_error=result.reason)
    elif isinstance(result, Exhausted) and info is not None:
        record, more = _exhausted(state, record, result.reason, info, now)
        effects += more
    elif isinstance(result, Vanished):
        # Gone, or replaced under the same name: its deletion arrives from the watch; look again
        # later rather than at once, so a pod that keeps vanishing cannot spin.
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        record = evolve(record, attempts=attempts, retry_at=retry_at)
        effects.append(Schedule(retry_at, record.uid))
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
    record = evolve(record, busy=None, workload=message.workload or record.workload)
    if message.pod is not None and _fresher(message.pod, record.pod):
        record = _observe(state, record, message.pod)
    if message.error is not None:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        # A hold's write failed: write it again on the retry.
        record = evolve(record, attempts=attempts, retry_at=retry_at, held=None)
        effects.append(Schedule(retry_at, record.uid))
    else:
        record = evolve(record, attempts=0 if record.granted is not None else record.attempts, recorded=True)
    return _consider_one(state, record, now, effects)


def _evicted(state: GateState, message: Evicted, now: datetime) -> Step:
    effects: list[Effect] = []
    info = state.info
    if info is None:
        return state, effects
    pod_ref = object_ref(message.pod, "Pod", "v1")
    name = pod_ref["name"]
    if message.error is None and not message.gone:
        if message.cause == "metering":
            event, text = "MeteringFailureEvicted", f"pod {name} evicted: {message.reason}"
        else:
            event = "UngatedPodEvicted"
            text = f"pod {name} ran without a verified grant for {info.key} ({message.reason}): evicted"
        effects += [
            PostEvent(pod_ref, "Warning", event, text),
            PostEvent(info.ref(), "Warning", event, text),
        ]
    record = state.pods.get(message.uid)
    if record is None:
        return state, effects  # its deletion arrived first
    record = evolve(record, busy=None)
    why = message.reason
    if message.error is None:
        record = evolve(record, acted=True)
    elif message.transient:
        attempts = record.attempts + 1
        retry_at = backoff_at(state.policy, record.uid, attempts, now)
        record = evolve(record, attempts=attempts, retry_at=retry_at)
        effects.append(Schedule(retry_at, record.uid))
    else:
        record = evolve(record, acted=True)
        what = "cannot be evicted" if message.cause == "metering" else "runs without a verified grant"
        text = f"pod {record.name} {what} for {info.key} ({why}); eviction failed: {message.error}"
        effects += [
            PostEvent(pod_ref, "Warning", "EvictionFailed", text),
            PostEvent(info.ref(), "Warning", "EvictionFailed", text),
        ]
    state.book.put(record)
    return state, effects


# --- scope Cluster -----------------------------------------------------------------------------------


def _ensure_cluster(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    info = state.info
    if info is None or not info.active or not info.cluster_scope or state.cluster_busy:
        return state, effects
    if info.license is not None:
        return state, effects  # contract products check licenses out instead
    cluster = state.cluster
    if cluster is not None and not cluster.due(now):
        return state, effects
    effects.append(RegisterCluster(info, cluster, state.cluster_attempts + 1))
    return evolve(state, cluster_busy=True), effects


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
    state = evolve(state, cluster=result, cluster_busy=False, cluster_attempts=attempts)
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
        state = evolve(state, last_denial=result.reason)
    elif result.state is not EntitlementState.GRANTED:
        state = evolve(state, last_error=result.reason)
    if result.settled:
        return _consider_all(state, now, effects)
    return state, effects


# --- License Manager seats (contract products) --------------------------------------------------------
#
# A contract pod is granted on a live lease in the operator's own seat record (loaded once per
# controller: SeatsLoaded), never on its annotations. Each pod without one checks out (Checkout,
# counted against max_inflight like RegisterUsage). After every message the seats are reviewed
# (plan_seats): leases of pods that went away are checked in, leases near expiry extended, lapsed
# ones forgotten (AWS returned the seat); a freed seat wakes the pods that wait for one at once.


def _consider_license(
    state: GateState, record: PodRecord, now: datetime
) -> tuple[PodRecord, list[Effect], int]:
    info = state.info
    inflight = state.inflight
    assert info is not None
    if not state.seats_loaded:
        return record, [], inflight  # decided once the operator's seat record is read
    source = info.license
    assert source is not None
    per_cluster = any(e.per_cluster is not None for e in source.entitlements)
    per_pod = any(e.per_pod is not None for e in source.entitlements)
    if per_cluster:
        if state.seats_cluster_denied is not None:
            # The product's own checkout was refused for good: no pod of it runs.
            reason = state.seats_cluster_denied
            record = evolve(record, denied=reason, waiting=None, reason=reason)
            release = info.mode is EntitlementMode.AUDIT and ent.is_gated(record.pod)
            effect = Deny(record.pod, info, reason, release=release, durable=False, at=now)
            return evolve(record, busy=Busy.WRITE), [effect], inflight
        cluster = _live_seat(state, CLUSTER_HOLDER, now)
        if cluster is None:
            return record, [], inflight  # decided once the product's checkout answers
        if not per_pod:
            proof = Proof(cluster.signed, cluster.issued_at)
            record = evolve(record, granted=proof, waiting=None, reason="", attempts=0)
            return _consider(state, record, now)
    own = _live_seat(state, record.uid, now)
    if own is not None:
        # The operator's own record of a live checkout for this pod: the proof.
        proof = Proof(own.signed, own.issued_at)
        record = evolve(record, granted=proof, waiting=None, reason="", attempts=0)
        return _consider(state, record, now)
    seat = state.seats.get(record.uid)
    # Another pod goes first: one that waits for a seat and came first (a freed seat goes to the
    # pod that waited longest, not to a new pod racing it), or a running pod not answered yet.
    if state.book.ahead(record):
        reason = f"{SEATS_EXHAUSTED}: other pods of the product are ahead in the queue for a free seat"
        record, effects = _exhausted(state, record, reason, info, now)
        return record, effects, inflight
    if inflight >= state.policy.max_inflight:
        return record, [], inflight
    count = seat.held.count if seat is not None else 0
    return evolve(record, busy=Busy.REGISTER), [Checkout(record.pod, info, count + 1)], inflight + 1


def _live_seat(state: GateState, holder: str, now: datetime) -> HeldSeat | None:
    seat = state.seats.get(holder)
    if seat is None or seat.held.lease is None or seat.held.lease.lapsed(now) or not seat.held.signed:
        return None
    return seat.held


def _cluster_checked_out(state: GateState, result: RegisterResult, now: datetime) -> Step:
    """The product's per-cluster checkout answered (the seat itself is taken in by _registered)."""
    effects: list[Effect] = []
    state = evolve(state, seats_cluster_busy=False)
    if isinstance(result, Granted):
        state = evolve(state, seats_cluster_attempts=0, seats_cluster_retry=None)
        return _consider_all(state, now, effects)
    if isinstance(result, Denied):
        state = evolve(state, seats_cluster_denied=result.reason, last_denial=result.reason)
        info = state.info
        if info is not None:
            effects.append(
                PostEvent(
                    info.ref(),
                    "Warning",
                    "ClusterCheckoutDenied",
                    f"License Manager refused the product's per-cluster entitlements: {result.reason}",
                )
            )
        return _consider_all(state, now, effects)
    reason = result.reason if isinstance(result, Exhausted | Failed) else "the checkout went unanswered"
    attempts = state.seats_cluster_attempts + 1
    retry_at = backoff_at(state.policy, CLUSTER_HOLDER, attempts, now)
    if isinstance(result, Exhausted):
        known = state.seats.get(CLUSTER_HOLDER)
        if known is None or (known.held.lease is None and known.held.count < result.count):
            state.book.set_seat(CLUSTER_HOLDER, Seat(HeldSeat(CLUSTER_HOLDER, result.count)))
    # Its timer is set by the seat review that follows every step.
    state = evolve(state, seats_cluster_attempts=attempts, seats_cluster_retry=retry_at, last_error=reason)
    return state, effects


def _exhausted(
    state: GateState, record: PodRecord, reason: str, info: ProductInfo, now: datetime
) -> tuple[PodRecord, list[Effect]]:
    """No seat free: the pod waits (Pending, with the reason), retried on the backoff and at once
    when a seat of the product is checked in or lapses."""
    effects: list[Effect] = []
    attempts = record.attempts + 1
    retry_at = backoff_at(state.policy, record.uid, attempts, now)
    # One write and one Event per wait: the reason's wording may change while it waits.
    changed = not record.waits_for_seat
    if not changed:
        reason = record.reason
    record = evolve(
        record, attempts=attempts, retry_at=retry_at, waiting=EntitlementState.PENDING, reason=reason
    )
    effects.append(Schedule(retry_at, record.uid))
    audit = info.mode is EntitlementMode.AUDIT
    if changed or (audit and ent.is_gated(record.pod)):
        record = evolve(record, busy=Busy.WRITE)
        release = audit and ent.is_gated(record.pod)
        effects.append(WriteState(record.pod, info, EntitlementState.PENDING, reason, release=release))
    if changed:
        effects.append(
            PostEvent(
                object_ref(record.pod, "Pod", "v1"),
                "Warning" if not audit else "Normal",
                SEATS_EXHAUSTED,
                f"no License Manager seat free for {info.key}: {reason.removeprefix(SEATS_EXHAUSTED + ': ')}"
                + ("" if audit or not ent.is_gated(record.pod) else "; the pod stays gated until one frees"),
            )
        )
    return record, effects


def _seats_loaded(state: GateState, message: SeatsLoaded, now: datetime) -> Step:
    effects: list[Effect] = []
    if message.seats is None:
        retry_at = backoff_at(state.policy, SEATS, 1, now)
        effects.append(Schedule(retry_at, SEATS))
        return evolve(state, seats_loading=False, seats_review_at=retry_at, last_error=message.error), effects
    state.book.load_seats((holder, Seat(held)) for holder, held in message.seats.items())
    state = evolve(state, seats_loaded=True, seats_loading=False)
    return _consider_all(state, now, effects)


def _wake_waiting(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    """A seat came free: the pods waiting for one try again now (not at their backoff timer)."""
    book = state.book
    woken = False
    for uid in list(book.seat_waiters):
        record = book.pods[uid]
        if record.busy is None:
            book.put(evolve(record, retry_at=None))
            woken = True
    if not woken:
        return state, effects
    return _dispatch_queued(state, now, effects)


def _seat_done(state: GateState, message: SeatDone, now: datetime) -> Step:
    effects: list[Effect] = []
    seat = state.seats.get(message.holder)
    info = state.info
    if seat is None or info is None:
        return state, effects
    book = state.book
    if message.error is not None and not message.gone:
        attempts = seat.attempts + 1
        retry_at = backoff_at(state.policy, f"{SEATS}:{message.holder}", attempts, now)
        book.set_seat(message.holder, replace(seat, busy=False, attempts=attempts, retry_at=retry_at))
        effects.append(Schedule(retry_at, SEATS))
        return evolve(state, last_error=message.error), effects
    if message.action is SeatAction.EXTEND and not message.gone and message.seat is not None:
        book.set_seat(message.holder, Seat(message.seat))
        return state, effects
    # Checked in, or gone at AWS already: the seat is free.
    record = state.pods.get(message.holder)
    if message.holder == CLUSTER_HOLDER and message.action is SeatAction.EXTEND:
        # The product's lease lapsed before it could be extended: the review checks out again.
        book.set_seat(message.holder, Seat(replace(seat.held, lease=None, signed="")))
        effects.append(ForgetSeat(info, message.holder))
    elif record is not None and not ent.is_terminating(record.pod):
        # A live pod lost its lease (it lapsed before it could be extended): check out again.
        book.set_seat(message.holder, Seat(replace(seat.held, lease=None, signed="")))
        state.book.put(evolve(record, granted=None, attempts=0, retry_at=None))
        if message.action is SeatAction.EXTEND:
            effects.append(ForgetSeat(info, message.holder))
    else:
        book.drop_seat(message.holder)
        if message.gone and message.action is SeatAction.EXTEND:
            effects.append(ForgetSeat(info, message.holder))
    state, effects = _wake_waiting(state, now, effects)
    record = state.pods.get(message.holder)
    if record is not None:
        return _consider_one(state, record, now, effects)
    return state, effects


def _ensure_cluster_checkout(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    info = state.info
    if info is None or not info.active or state.seats_cluster_busy or state.seats_cluster_denied:
        return state, effects
    if _live_seat(state, CLUSTER_HOLDER, now) is not None:
        return state, effects
    if state.seats_cluster_retry is not None and state.seats_cluster_retry > now:
        return state, effects
    seat = state.seats.get(CLUSTER_HOLDER)
    if seat is not None and seat.busy:
        return state, effects
    count = seat.held.count if seat is not None else 0
    effects.append(CheckoutCluster(info, count + 1))
    return evolve(state, seats_cluster_busy=True), effects


def _review_seats(state: GateState, now: datetime, effects: list[Effect]) -> Step:
    """Bring the seats in line with the pods (after every step): check in the seats of pods that
    went away, extend leases near expiry, forget lapsed ones, and schedule the next review.

    Only the holders that can have something to do are looked at (the book's
    :meth:`~metering_operator.gate.book.Book.seat_candidates`), in the seats' order, so a step
    costs O(log n) in the seats, not a plan of every seat."""
    info = state.info
    assert info is not None
    if not state.seats_loaded:
        retry_at = state.seats_review_at
        if not state.seats_loading and (retry_at is None or retry_at <= now):
            effects.append(LoadSeats(info))
            state = evolve(state, seats_loading=True)
        return state, effects
    if not state.listed:
        return state, effects  # which pods live is not known yet: nothing is checked in blindly
    book = state.book
    # A terminating pod returns its seat as its deletion starts: the pod still exists, so its own
    # (pod-bound) identity can check the seat in. Mode Off needs no seat at all.
    off = info.mode is EntitlementMode.OFF
    source = info.license
    assert source is not None
    # Per-cluster entitlements are held once, as the operator, while any pod of the product runs.
    cluster_needed = (
        not off and bool(book.needed) and any(e.per_cluster is not None for e in source.entitlements)
    )
    if cluster_needed:
        state, effects = _ensure_cluster_checkout(state, now, effects)
    pods_needed = {} if off else book.needed

    def needed(holder: str) -> bool:
        return holder in pods_needed or (cluster_needed and holder == CLUSTER_HOLDER)

    candidates = book.seat_candidates(now, (info, off, cluster_needed))
    seats = book.seats
    freed = False
    leases = []
    wanted = set()
    for holder in candidates:
        seat = seats[holder]
        if seat.busy or (seat.retry_at is not None and seat.retry_at > now):
            continue
        if seat.held.lease is None:
            if not needed(holder):
                book.drop_seat(holder)
                effects.append(ForgetSeat(info, holder))
            continue
        leases.append(seat.held.lease)
        if needed(holder):
            wanted.add(holder)
    for planned in plan_seats(wanted, leases, now):
        found = seats.get(planned.holder)
        if found is None or planned.lease is None:
            continue  # Checkout: a pod's own path (_consider_license) asks for its seat
        seat = found
        if planned.action is SeatAction.FORGET:
            freed = True
            if needed(planned.holder):
                book.set_seat(planned.holder, replace(seat, held=replace(seat.held, lease=None, signed="")))
                record = state.pods.get(planned.holder)
                if record is not None and record.granted is not None:
                    book.put(evolve(record, granted=None, attempts=0, retry_at=None))
            else:
                book.drop_seat(planned.holder)
                effects.append(ForgetSeat(info, planned.holder))
        else:
            book.set_seat(planned.holder, replace(seat, busy=True, retry_at=None))
            effects.append(SeatOp(info, planned.action, seat.held))
    if freed:
        state, effects = _wake_waiting(state, now, effects)
        state, effects = _consider_all(state, now, effects)
    for holder in candidates:
        if (reviewed := seats.get(holder)) is not None:
            _seat_next(book, holder, reviewed, now)
    # Leases waiting for a retry are looked at again at their retry time, not before.
    upcoming = [] if (due := book.next_seat_review()) is None else [due]
    if state.seats_cluster_retry is not None and state.seats_cluster_retry > now:
        upcoming.append(state.seats_cluster_retry)
    at = min(upcoming) if upcoming else None
    if at is not None and at != state.seats_review_at:
        effects.append(Schedule(at, SEATS))
        state = evolve(state, seats_review_at=at)
    return state, effects


def _seat_next(book: Book, holder: str, seat: Seat, now: datetime) -> None:
    """When the review must next look at this seat: its retry, or, for an idle lease, when its
    extension is due (``next_review``) or it lapses."""
    times = [seat.retry_at] if seat.retry_at is not None and seat.retry_at > now else []
    lease = seat.held.lease
    if not seat.busy and lease is not None and (seat.retry_at is None or seat.retry_at <= now):
        due = next_review([lease], now)
        if due is not None:
            times.append(due)
        if lease.expiration is not None and lease.expiration > now:
            times.append(lease.expiration)
    if times:
        book.seat_next.set(holder, min(times))
    else:
        book.seat_next.discard(holder)


# --- views -------------------------------------------------------------------------------------------


def workload_members(state: GateState) -> dict[WorkloadRef, list[ent.MemberView]]:
    """Each known workload's pods, as the summary annotation reports them."""
    members: dict[WorkloadRef, list[ent.MemberView]] = {}
    for record in state.book.live():
        if record.workload is None:
            continue
        proof = record.granted
        members.setdefault(record.workload, []).append(
            ent.MemberView(record.state, proof.token if proof else None, proof.issued_at if proof else None)
        )
    return members
