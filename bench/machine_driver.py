"""Feeds one tree's gate state machine (``gate/machine.py``) synthetic messages; run by
bench/bench_machine.py in a subprocess whose PYTHONPATH is that tree's ``operator/`` (the base
commit's worktree, or this tree), so both machines see the same messages in one run.

``burst``: N gated pods created at once, each registered (or checked out) and written, answered in
the order the effects were asked for; prints one JSON line (steps, CPU and wall seconds).

``trace``: a seeded random world (pods created, deleted, terminating, ungated; registrations
granted, denied, throttled, failed, vanished; writes and evictions failing; clock jumps and
timers; spec changes, holds, relists; contract seats) that answers the machine's effects; prints
the SHA-256 of every step's effects and the final pods, so two trees' behaviour is compared
message by message. Uses only the machine's public messages and effects, which both trees share.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import random
import sys
import time
from collections import Counter, deque
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from metering_operator.domain.license_seats import CLUSTER_HOLDER, HeldSeat, SeatAction, SeatLease
from metering_operator.domain.onfailure import Hold
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    CheckoutType,
    MeteredProductSpec,
)
from metering_operator.gate import machine
from metering_operator.gate import model as m
from metering_operator.gate.product import ProductInfo

T0 = datetime(2031, 3, 4, 10, 0, tzinfo=UTC)
#: RegisterUsage per pod; License Manager seats per pod; and with a per-cluster entitlement too.
SCOPES = ("pod", "license", "license-cluster")


def product(scope: str, mode: str = "Enforce", generation: int = 1) -> ProductInfo:
    entitlement: dict[str, Any] = {"mode": mode}
    if scope != "pod":
        wanted: list[dict[str, Any]] = [{"name": "seats", "perPod": 1}]
        if scope == "license-cluster":
            wanted.insert(0, {"name": "site", "perCluster": 1})
        entitlement |= {
            "source": "LicenseManager",
            "licenseManager": {"productSKU": "prod-x", "entitlements": wanted},
        }
    body: dict[str, Any] = {
        "productCode": "benchproduct0000000000001",
        "publicKeyVersion": 1,
        "selector": {"matchLabels": {"app": "bench"}},
        "entitlement": entitlement,
        "metering": {"dimensions": [{"name": "users", "source": "Replicas"}]},
    }
    if scope == "pod":
        body["publicKey"] = {"pem": "-----BEGIN PUBLIC KEY-----\nunused\n-----END PUBLIC KEY-----"}
    spec = MeteredProductSpec.model_validate(body)
    key = _public_key() if scope == "pod" else None
    return ProductInfo("bench", "paid", "product-uid", generation, spec, True, key, None)


_KEY: list[Any] = []


def _public_key() -> Any:
    """A real RSA public key (the product must be usable); signatures are never checked here, as
    the burst's and trace's pods carry none until the machine has granted them."""
    if not _KEY:
        from cryptography.hazmat.primitives.asymmetric import rsa

        _KEY.append(rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key())
    return _KEY[0]


def pod(uid: str, *, gated: bool = True, rv: int = 1, minute: int = 0) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": "bench",
            "uid": uid,
            "resourceVersion": str(rv),
            "creationTimestamp": (T0 - timedelta(minutes=minute)).isoformat().replace("+00:00", "Z"),
            "annotations": {},
        },
        "spec": {
            "serviceAccountName": "buyer",
            "schedulingGates": [{"name": SCHEDULING_GATE}] if gated else [],
        },
        "status": {"phase": "Pending" if gated else "Running"},
    }


def uid_of(p: Any) -> str:
    return str(p["metadata"]["uid"])


def seat(uid: str, count: int, now: datetime, minutes: int = 60) -> HeldSeat:
    lease = SeatLease(uid, f"lct-{uid}-{count}", CheckoutType.PROVISIONAL, now + timedelta(minutes=minutes))
    return HeldSeat(uid, count, lease, signed=f"jws-{uid}-{count}", issued_at=now, pod=f"pod-{uid}")


def written(p: dict[str, Any], *, release: bool, notes: dict[str, str]) -> dict[str, Any]:
    meta = dict(p["metadata"])
    meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)
    meta["annotations"] = {**meta.get("annotations", {}), **notes}
    spec = dict(p["spec"])
    if release:
        spec["schedulingGates"] = []
    return {**p, "metadata": meta, "spec": spec}


# --- burst ---------------------------------------------------------------------------------------------


def burst(n: int, scope: str, max_inflight: int) -> dict[str, Any]:
    """N pods at once; every call answers at once, in the order asked for (a perfect AWS)."""
    now = T0
    state = m.GateState(policy=m.GatePolicy(max_inflight=max_inflight))
    steps = 0
    work: deque[m.Effect] = deque()

    def send(message: m.Message) -> None:
        nonlocal state, steps
        state, effects = machine.step(state, message, now)
        steps += 1
        work.extend(effects)

    pods = [pod(f"p{i:05d}", minute=n - i) for i in range(n)]
    info = product(scope)  # spec validation and key generation are not the machine's work
    cpu0, wall0 = time.process_time(), time.perf_counter()
    send(m.ProductChanged(info))
    send(m.Listed((), {}))
    if scope != "pod":
        send(m.SeatsLoaded({}))
    for p in pods:
        send(m.PodUpdated(p))
    while work:
        effect = work.popleft()
        if isinstance(effect, m.Register):
            send(m.Registered(uid_of(effect.pod), m.Granted(f"tok-{uid_of(effect.pod)}", now)))
        elif isinstance(effect, m.Checkout):
            held = seat(uid_of(effect.pod), effect.count, now)
            send(m.Registered(uid_of(effect.pod), m.Granted(held.signed, now, seat=held)))
        elif isinstance(effect, m.CheckoutCluster):
            held = seat(CLUSTER_HOLDER, effect.count, now)
            send(m.Registered(CLUSTER_HOLDER, m.Granted(held.signed, now, seat=held)))
        elif isinstance(effect, m.WriteGrant):
            notes = {ANNOTATION_SIGNATURE: effect.proof.token, ANNOTATION_ENTITLEMENT: "Granted"}
            released = written(dict(effect.pod), release=True, notes=notes)
            send(m.Written(uid_of(released), released))
            send(m.PodUpdated(released))  # the watch's echo of the write
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    registered = state.counts().registered
    if registered != n:
        raise SystemExit(f"burst ended with {registered} of {n} pods granted")
    return {"pods": n, "scope": scope, "steps": steps, "cpu": cpu, "wall": wall}


# --- trace ---------------------------------------------------------------------------------------------


def canon(value: Any) -> Any:
    """Effects as plain data: pods by uid and resourceVersion, the product by generation and mode."""
    if isinstance(value, ProductInfo):
        return f"product@{value.generation}/{value.mode.value}"
    if isinstance(value, dict) and "metadata" in value:
        meta = value["metadata"]
        return f"pod:{meta.get('uid')}@{meta.get('resourceVersion')}"
    if isinstance(value, datetime):
        return value.isoformat()
    if is_dataclass(value) and not isinstance(value, type):
        return [type(value).__name__] + [[f.name, canon(getattr(value, f.name))] for f in fields(value)]
    if isinstance(value, dict):
        return sorted((str(k), canon(v)) for k, v in value.items())
    if isinstance(value, list | tuple | frozenset | set):
        items = [canon(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, frozenset | set) else items
    if hasattr(value, "value"):
        return value.value
    return value


def snapshot(state: m.GateState) -> Any:
    pods = [
        [
            uid,
            canon(r.state),
            canon(r.busy),
            r.attempts,
            canon(r.retry_at),
            r.reason,
            r.acted,
            r.ungated,
            r.held,
        ]
        for uid, r in state.pods.items()
    ]
    return [pods, canon(state.counts()), state.held(), state.inflight, state.exhausted(), state.ungated()]


class World:
    """Answers the machine's effects at random (seeded): the same effects get the same answers."""

    def __init__(self, seed: int, scope: str, max_inflight: int) -> None:
        self.rng = random.Random(seed)
        self.scope = scope
        self.now = T0
        self.state = m.GateState(policy=m.GatePolicy(max_inflight=max_inflight))
        self.pods: dict[str, dict[str, Any]] = {}
        self.work: list[m.Effect] = []
        self.timers: list[tuple[datetime, int, str]] = []
        self.seq = 0
        self.denials: dict[str, str] = {}
        self.seats: dict[str, HeldSeat] = {}
        self.generation = 1
        self.mode = "Enforce"
        self.digest = hashlib.sha256()
        self.steps = 0
        self.kinds: Counter[str] = Counter()
        #: Every step's message and effects (``--log``), to find where two trees part.
        self.log: Any = None

    def send(self, message: m.Message) -> None:
        self.state, effects = machine.step(self.state, message, self.now)
        self.steps += 1
        line = json.dumps([self.steps, canon(effects), self.state.inflight], default=str)
        self.digest.update(line.encode())
        if self.log is not None:
            self.log.write(f"{type(message).__name__} {canon(message)!s:.300}\n  {line}\n")
        self.kinds.update(type(e).__name__ for e in effects)
        for effect in effects:
            if isinstance(effect, m.Schedule):
                self.seq += 1
                heapq.heappush(self.timers, (effect.at, self.seq, effect.key))
            elif not isinstance(effect, m.PostEvent | m.PruneDenials | m.ForgetSeat | m.FindWorkload):
                self.work.append(effect)

    def update(self, p: dict[str, Any]) -> None:
        self.pods[uid_of(p)] = p
        self.send(m.PodUpdated(p))

    def answer(self, effect: m.Effect) -> None:
        rng = self.rng
        if isinstance(effect, m.LoadSeats):
            self.send(
                m.SeatsLoaded(dict(self.seats)) if rng.random() < 0.8 else m.SeatsLoaded(None, "Forbidden")
            )
            return
        if isinstance(effect, m.SeatOp):
            holder = effect.seat.holder
            roll = rng.random()
            if roll < 0.15:
                self.send(m.SeatDone(holder, effect.action, error="ThrottlingException"))
            elif roll < 0.25:
                self.seats.pop(holder, None)
                self.send(m.SeatDone(holder, effect.action, gone=True))
            elif effect.action is SeatAction.EXTEND:
                held = seat(holder, effect.seat.count, self.now, minutes=rng.choice((30, 60)))
                self.seats[holder] = held
                self.send(m.SeatDone(holder, effect.action, seat=held))
            else:
                self.seats.pop(holder, None)
                self.send(m.SeatDone(holder, effect.action))
            return
        if isinstance(effect, m.CheckoutCluster):
            roll = rng.random()
            if roll < 0.7:
                held = seat(CLUSTER_HOLDER, effect.count, self.now, minutes=rng.choice((25, 60)))
                self.seats[CLUSTER_HOLDER] = held
                self.send(m.Registered(CLUSTER_HOLDER, m.Granted(held.signed, self.now, seat=held)))
            elif roll < 0.8:
                self.send(
                    m.Registered(CLUSTER_HOLDER, m.Exhausted("SeatsExhausted: site held", effect.count))
                )
            elif roll < 0.83:
                self.send(m.Registered(CLUSTER_HOLDER, m.Denied("NoEntitlementsAllowed")))
            else:
                self.send(m.Registered(CLUSTER_HOLDER, m.Failed("ThrottlingException", transient=True)))
            return
        if not isinstance(effect, m.Register | m.Checkout | m.WriteGrant | m.WriteState | m.Deny | m.Evict):
            raise AssertionError(f"not driven here: {effect!r}")  # scope Cluster's RegisterCluster
        uid = uid_of(effect.pod)
        current = self.pods.get(uid)
        if isinstance(effect, m.Register | m.Checkout):
            roll = rng.random()
            if current is None or roll < 0.05:
                self.send(m.Registered(uid, m.Vanished()))
            elif roll < 0.55:
                if isinstance(effect, m.Checkout):
                    held = seat(uid, effect.count, self.now, minutes=rng.choice((25, 60)))
                    self.seats[uid] = held
                    self.send(m.Registered(uid, m.Granted(held.signed, self.now, seat=held)))
                else:
                    self.send(m.Registered(uid, m.Granted(f"tok-{uid}", self.now)))
            elif roll < 0.62 and isinstance(effect, m.Checkout):
                self.send(m.Registered(uid, m.Exhausted("SeatsExhausted: all seats held", effect.count)))
            elif roll < 0.75:
                self.send(m.Registered(uid, m.Denied("CustomerNotEntitledException")))
            elif roll < 0.9:
                self.send(m.Registered(uid, m.Failed("ThrottlingException: slow down", transient=True)))
            else:
                self.send(m.Registered(uid, m.Failed("AccessDenied: no role", transient=False)))
            return
        if isinstance(effect, m.Deny) and effect.durable and rng.random() < 0.9:
            self.denials[uid] = effect.reason  # the operator's record first (or that write fails)
        if isinstance(effect, m.WriteGrant | m.WriteState | m.Deny):
            if current is None or rng.random() < 0.1:
                self.send(m.Written(uid, None, error="Conflict"))
                return
            if isinstance(effect, m.WriteGrant):
                notes = {ANNOTATION_SIGNATURE: effect.proof.token, ANNOTATION_ENTITLEMENT: "Granted"}
                new = written(current, release=True, notes=notes)
            elif isinstance(effect, m.WriteState):
                new = written(
                    current, release=effect.release, notes={ANNOTATION_ENTITLEMENT: effect.state.value}
                )
            else:
                new = written(current, release=effect.release, notes={ANNOTATION_ENTITLEMENT: "Denied"})
            self.pods[uid] = new
            self.send(m.Written(uid, new))
            if rng.random() < 0.7:
                self.send(m.PodUpdated(new))
            return
        if isinstance(effect, m.Evict):
            roll = rng.random()
            if current is None or roll < 0.1:
                self.send(m.Evicted(uid, effect.pod, effect.reason, gone=True, cause=effect.cause))
            elif roll < 0.25:
                self.send(
                    m.Evicted(uid, effect.pod, effect.reason, error="429", transient=True, cause=effect.cause)
                )
            elif roll < 0.3:
                self.send(m.Evicted(uid, effect.pod, effect.reason, error="PDB", cause=effect.cause))
            else:
                self.send(m.Evicted(uid, effect.pod, effect.reason, cause=effect.cause))
                self.delete(uid)
            return
        raise AssertionError(f"unanswered effect {effect!r}")

    def delete(self, uid: str) -> None:
        if self.pods.pop(uid, None) is not None:
            self.send(m.PodDeleted(uid))

    def run(self, steps: int) -> None:
        rng = self.rng
        self.send(m.ProductChanged(product(self.scope)))
        self.send(m.Listed((), {}))
        created = 0
        while self.steps < steps:
            roll = rng.random()
            if roll < 0.25 or not self.pods:
                created += 1
                self.update(pod(f"q{created:05d}", gated=rng.random() < 0.85, minute=rng.randrange(30)))
            elif roll < 0.6 and self.work:
                self.answer(self.work.pop(rng.randrange(len(self.work)) if rng.random() < 0.3 else 0))
            elif roll < 0.7:
                self.now += timedelta(seconds=rng.choice((0.2, 1, 5, 30, 300, 1500)))
                while self.timers and self.timers[0][0] <= self.now:
                    self.send(m.Due(heapq.heappop(self.timers)[2]))
            elif roll < 0.75:
                self.delete(rng.choice(sorted(self.pods)))
            elif roll < 0.78:
                uid = rng.choice(sorted(self.pods))
                p = self.pods[uid]
                meta = {
                    **p["metadata"],
                    "deletionTimestamp": self.now.isoformat(),
                    "resourceVersion": "999999",
                }
                self.update({**p, "metadata": meta})
            elif roll < 0.81:
                uid = rng.choice(sorted(self.pods))
                p = self.pods[uid]
                self.update(
                    {**p, "spec": {**p["spec"], "schedulingGates": []}, "status": {"phase": "Running"}}
                )
            elif roll < 0.82:
                self.generation += 1
                self.mode = rng.choice(("Enforce", "Enforce", "Audit"))
                self.send(m.ProductChanged(product(self.scope, self.mode, self.generation)))
            elif roll < 0.83:
                hold = (
                    Hold("no hour reported for 6 hours", evict=rng.random() < 0.5)
                    if rng.random() < 0.3
                    else None
                )
                self.send(m.MeteringHold(hold))
            elif roll < 0.84:
                self.send(m.Listed(tuple(self.pods.values()), dict(self.denials)))
            else:
                self.update(self.pods[rng.choice(sorted(self.pods))])  # a resync's unchanged event
        self.digest.update(json.dumps(snapshot(self.state), default=str).encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("burst")
    b.add_argument("--pods", type=int, nargs="+", default=[200, 2000])
    b.add_argument("--scope", choices=SCOPES, default="pod")
    b.add_argument("--max-inflight", type=int, default=16)
    t = sub.add_parser("trace")
    t.add_argument("--seeds", type=int, default=20)
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--scope", choices=SCOPES, default="pod")
    t.add_argument("--max-inflight", type=int, default=4)
    t.add_argument("--log", help="write each seed's steps to LOG.<seed>")
    args = parser.parse_args(argv)
    where = machine.__file__
    if args.mode == "burst":
        for n in args.pods:
            print(json.dumps({"machine": where, **burst(n, args.scope, args.max_inflight)}), flush=True)
        return 0
    for seed in range(args.seeds):
        world = World(seed, args.scope, args.max_inflight)
        if args.log is not None:
            world.log = open(f"{args.log}.{seed}", "w")  # noqa: SIM115 (closed with the process)
        world.run(args.steps)
        print(
            json.dumps(
                {
                    "machine": where,
                    "seed": seed,
                    "steps": world.steps,
                    "sha256": world.digest.hexdigest(),
                    "effects": dict(sorted(world.kinds.items())),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
