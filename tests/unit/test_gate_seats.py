"""The gate's state machine for contract products (License Manager seats), with a fake clock.

Each test feeds ``step`` what the API server and the workers would say and checks the effects it
asks for: checkouts, the proof (the operator's seat record, never a pod annotation), waiting for a
seat, check-ins, extensions and what a restart finds in the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from metering_operator.domain.license_seats import HeldSeat, SeatAction, SeatLease
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    SCHEDULING_GATE,
    CheckoutType,
    EntitlementState,
    MeteredProductSpec,
)
from metering_operator.gate import machine
from metering_operator.gate import model as m
from metering_operator.gate.product import ProductInfo

T0 = datetime(2031, 3, 4, 10, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def info(
    mode: str = "Enforce", generation: int = 1, entitlements: list[dict[str, Any]] | None = None
) -> ProductInfo:
    spec = MeteredProductSpec.model_validate(
        {
            "productCode": "contractproduct00000001",
            "publicKeyVersion": 1,
            "selector": {"matchLabels": {"app": "contract"}},
            "entitlement": {
                "mode": mode,
                "source": "LicenseManager",
                "licenseManager": {
                    "productSKU": "prod-x",
                    "entitlements": entitlements or [{"name": "seats", "perPod": 1}],
                },
            },
            "metering": {"dimensions": [{"name": "users", "source": "Replicas"}]},
        }
    )
    return ProductInfo("shop", "contract", "product-uid", generation, spec, True, None, None)


def pod(
    uid: str = "u1",
    *,
    gated: bool = True,
    notes: dict[str, str] | None = None,
    rv: str = "1",
    created: str = "2031-03-04T09:00:00Z",
    phase: str | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"pod-{uid}",
            "namespace": "shop",
            "uid": uid,
            "resourceVersion": rv,
            "creationTimestamp": created,
            "annotations": dict(notes or {}),
        },
        "spec": {
            "serviceAccountName": "buyer",
            "schedulingGates": [{"name": SCHEDULING_GATE}] if gated else [],
        },
        "status": {"phase": phase or ("Pending" if gated else "Running")},
    }


def seat(uid: str, *, expires: datetime | None = None, count: int = 1, signed: str = "jws") -> HeldSeat:
    lease = SeatLease(uid, f"token-{uid}-{count}", CheckoutType.PROVISIONAL, expires or T0 + HOUR)
    return HeldSeat(uid, count, lease, signed=f"{signed}-{uid}", issued_at=T0, pod=f"pod-{uid}")


class Driver:
    def __init__(self, product: ProductInfo | None = None, **policy: Any) -> None:
        self.now = T0
        self.state = m.GateState(policy=m.GatePolicy(**policy))
        self.effects: list[m.Effect] = []
        self.send(m.ProductChanged(product or info()))

    def send(self, message: m.Message) -> list[m.Effect]:
        self.state, effects = machine.step(self.state, message, self.now)
        self.effects += effects
        return effects

    def start(self, *pods: dict[str, Any], seats: dict[str, HeldSeat] | None = None) -> list[m.Effect]:
        first = self.send(m.Listed(tuple(pods), {}))
        return first + self.send(m.SeatsLoaded(seats or {}))

    def grant(self, uid: str, held: HeldSeat | None = None) -> list[m.Effect]:
        held = held or seat(uid)
        return self.send(m.Registered(uid, m.Granted(held.signed, held.issued_at, seat=held)))

    def advance(self, delta: timedelta) -> None:
        self.now += delta


def kinds(effects: Sequence[m.Effect]) -> list[str]:
    return [type(e).__name__ for e in effects]


def of(effects: Sequence[m.Effect], kind: type[Any]) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def test_nothing_is_decided_before_the_seat_record_is_read() -> None:
    d = Driver()
    assert kinds(d.effects) == ["LoadSeats"]  # asked for as soon as the product is known
    effects = d.send(m.Listed((pod(),), {}))
    assert effects == []  # no checkout, no check-in: the record is not known yet
    assert d.state.pods["u1"].busy is None
    effects = d.send(m.SeatsLoaded({}))
    (checkout,) = of(effects, m.Checkout)
    assert checkout.count == 1


def test_an_unreadable_seat_record_is_retried_and_decides_nothing() -> None:
    d = Driver()
    d.send(m.Listed((pod(),), {}))
    effects = d.send(m.SeatsLoaded(None, "KubernetesApi403: Forbidden"))
    assert kinds(effects) == ["Schedule"]
    d.advance(timedelta(seconds=5))
    assert kinds(d.send(m.Due(m.SEATS))) == ["LoadSeats"]


def test_a_verified_checkout_grants_the_pod_and_its_record_is_the_proof() -> None:
    d = Driver()
    d.start(pod())
    effects = d.grant("u1")
    (write,) = of(effects, m.WriteGrant)
    assert write.proof.token == "jws-u1"
    assert d.state.seats_held() == 1
    assert d.state.pods["u1"].state is EntitlementState.GRANTED
    # The extension is scheduled before the lease ends (20 minutes ahead).
    assert any(isinstance(e, m.Schedule) and e.at == T0 + HOUR - timedelta(minutes=20) for e in effects)


def test_pod_annotations_are_never_proof_of_a_contract_grant() -> None:
    d = Driver()
    forged = {ANNOTATION_ENTITLEMENT: "Granted", ANNOTATION_SIGNATURE: "jws-u1"}
    effects = d.start(pod(gated=True, notes=forged))
    assert kinds(of(effects, m.Checkout)) == ["Checkout"]
    assert d.state.pods["u1"].granted is None


def test_after_a_restart_a_live_lease_on_record_grants_without_a_checkout() -> None:
    d = Driver()
    effects = d.start(pod(gated=False), seats={"u1": seat("u1")})
    assert not of(effects, m.Checkout)
    assert d.state.pods["u1"].state is EntitlementState.GRANTED


def test_no_seat_free_the_pod_waits_with_a_reason_and_an_event() -> None:
    d = Driver()
    d.start(pod())
    effects = d.send(m.Registered("u1", m.Exhausted("SeatsExhausted: all 3 in use", 1)))
    (write,) = of(effects, m.WriteState)
    assert write.state is EntitlementState.PENDING
    assert write.reason.startswith("SeatsExhausted")
    assert [e.reason for e in of(effects, m.PostEvent)] == ["SeatsExhausted"]
    assert of(effects, m.Schedule)
    assert d.state.exhausted() == 1
    # Retried on its timer, with a new checkout number (an answered ClientToken is not reused).
    d.send(m.Written("u1", pod(rv="2")))
    d.advance(timedelta(minutes=2))
    (checkout,) = of(d.send(m.Due("u1")), m.Checkout)
    assert checkout.count == 2
    # Still none: no second Event or write for the same wait.
    effects = d.send(m.Registered("u1", m.Exhausted("SeatsExhausted: all 3 in use", 2)))
    assert not of(effects, m.PostEvent)
    assert not of(effects, m.WriteState)


def test_a_deleted_pods_seat_is_checked_in_and_the_longest_waiting_pod_gets_it_at_once() -> None:
    d = Driver()
    d.start(pod("a", created="2031-03-04T09:00:00Z"), pod("w", created="2031-03-04T09:01:00Z"))
    d.grant("a")
    d.send(m.Registered("w", m.Exhausted("SeatsExhausted: none free", 1)))
    d.send(m.Written("w", pod("w", rv="2", created="2031-03-04T09:01:00Z")))
    # A newer pod arrives while "w" waits: it queues behind, it does not race for the seat.
    late = pod("z", created="2031-03-04T09:05:00Z")
    effects = d.send(m.PodUpdated(late))
    assert not of(effects, m.Checkout)
    assert d.state.pods["z"].reason.startswith("SeatsExhausted")
    # "a" goes away: its seat is checked in ...
    effects = d.send(m.PodDeleted("a"))
    (checkin,) = of(effects, m.SeatOp)
    assert checkin.action is SeatAction.CHECK_IN
    assert checkin.seat.holder == "a"
    assert not of(effects, m.Checkout)  # the seat is not free until AWS says so
    # ... and once it is, "w" (not "z") checks out at once, without waiting for its timer.
    effects = d.send(m.SeatDone("a", SeatAction.CHECK_IN))
    assert [c.pod["metadata"]["uid"] for c in of(effects, m.Checkout)] == ["w"]
    assert "a" not in d.state.seats


def test_a_lease_is_extended_before_it_ends_and_the_new_expiry_kept() -> None:
    d = Driver()
    d.start(pod(gated=False), seats={"u1": seat("u1")})
    d.advance(timedelta(minutes=41))
    (extend,) = of(d.send(m.Due(m.SEATS)), m.SeatOp)
    assert extend.action is SeatAction.EXTEND
    assert d.state.seats["u1"].busy
    assert not of(d.send(m.Due(m.SEATS)), m.SeatOp)  # not twice while one is in flight
    extended = seat("u1", expires=T0 + timedelta(minutes=101))
    effects = d.send(m.SeatDone("u1", SeatAction.EXTEND, seat=extended))
    assert d.state.seats["u1"].held.lease == extended.lease
    assert any(isinstance(e, m.Schedule) and e.at == T0 + timedelta(minutes=81) for e in effects)


def test_a_throttled_extension_is_retried_on_the_backoff() -> None:
    d = Driver()
    d.start(pod(gated=False), seats={"u1": seat("u1")})
    d.advance(timedelta(minutes=45))
    d.send(m.Due(m.SEATS))
    effects = d.send(m.SeatDone("u1", SeatAction.EXTEND, error="RateLimitExceededException: slow down"))
    retry = min(of(effects, m.Schedule), key=lambda s: s.at)
    assert retry.key == m.SEATS
    assert d.now < retry.at < d.now + timedelta(seconds=2)
    d.now = retry.at
    (again,) = of(d.send(m.Due(m.SEATS)), m.SeatOp)
    assert again.action is SeatAction.EXTEND


def test_a_lease_lost_at_aws_is_checked_out_again_for_the_live_pod() -> None:
    d = Driver()
    d.start(pod(gated=False), seats={"u1": seat("u1")})
    d.send(m.Written("u1", pod(gated=False, rv="2", notes={ANNOTATION_SIGNATURE: "jws-u1"})))
    d.advance(timedelta(minutes=45))
    d.send(m.Due(m.SEATS))
    effects = d.send(m.SeatDone("u1", SeatAction.EXTEND, gone=True))
    (checkout,) = of(effects, m.Checkout)
    assert checkout.count == 2
    assert d.state.pods["u1"].granted is None


def test_after_a_long_crash_lapsed_leases_are_forgotten_and_running_pods_check_out_first() -> None:
    d = Driver()
    lapsed = T0 - timedelta(minutes=5)
    effects = d.start(
        pod("r1", gated=False, created="2031-03-04T09:02:00Z"),
        pod("r2", gated=False, created="2031-03-04T09:03:00Z"),
        pod("w", gated=True, created="2031-03-04T09:00:00Z"),
        pod("gone", gated=False),
        seats={
            "r1": seat("r1", expires=lapsed),
            "r2": seat("r2", expires=lapsed),
            "old": seat("old", expires=lapsed),
        },
    )
    # No check-in of a lapsed lease (AWS returned the seat); the dead pod's entry is dropped.
    assert not any(isinstance(e, m.SeatOp) for e in effects)
    assert [f.holder for f in of(effects, m.ForgetSeat)] == ["old"]
    checked_out = {c.pod["metadata"]["uid"]: c.count for c in of(effects, m.Checkout)}
    # Running pods first (a new ClientToken: the lapsed checkout's number is not reused); the
    # gated pod waits although it is older.
    assert checked_out == {"r1": 2, "r2": 2, "gone": 1}
    assert d.state.pods["w"].reason.startswith("SeatsExhausted")


def test_a_final_refusal_denies_the_pod_durably_and_it_is_never_checked_out_again() -> None:
    d = Driver()
    d.start(pod())
    effects = d.send(m.Registered("u1", m.Denied("NoEntitlementsAllowed: no entitlement gpus")))
    (deny,) = of(effects, m.Deny)
    assert deny.durable
    d.send(m.Written("u1", pod(rv="2", notes={ANNOTATION_ENTITLEMENT: "Denied"})))
    d.advance(timedelta(hours=3))
    assert not of(d.send(m.Due(m.SEATS)), m.Checkout)
    assert not of(d.send(m.Due("u1")), m.Checkout)
    assert d.state.counts().denied == 1


def test_a_finished_pods_seat_is_checked_in_and_mode_off_returns_every_seat() -> None:
    d = Driver()
    d.start(pod("a", gated=False), pod("b", gated=False), seats={"a": seat("a"), "b": seat("b")})
    effects = d.send(m.PodUpdated(pod("a", gated=False, rv="2", phase="Succeeded")))
    assert [(s.action, s.seat.holder) for s in of(effects, m.SeatOp)] == [(SeatAction.CHECK_IN, "a")]
    effects = d.send(m.ProductChanged(info(mode="Off", generation=2)))
    assert [(s.action, s.seat.holder) for s in of(effects, m.SeatOp)] == [(SeatAction.CHECK_IN, "b")]


def test_a_checkout_answering_after_its_pod_was_deleted_is_checked_in() -> None:
    d = Driver()
    d.start(pod())
    d.send(m.PodDeleted("u1"))
    effects = d.grant("u1")
    (checkin,) = of(effects, m.SeatOp)
    assert checkin.action is SeatAction.CHECK_IN
    assert not of(effects, m.WriteGrant)


def test_register_usage_products_never_touch_seats() -> None:
    spec = MeteredProductSpec.model_validate(
        {
            "productCode": "hourlyproduct000000001",
            "publicKeyVersion": 1,
            "publicKey": {"pem": "-----BEGIN PUBLIC KEY-----\nunused\n-----END PUBLIC KEY-----"},
            "selector": {"matchLabels": {"app": "x"}},
        }
    )
    product = ProductInfo("shop", "x", "uid", 1, spec, True, object(), None)  # type: ignore[arg-type]
    d = Driver(product)
    effects = d.send(m.Listed((pod(),), {}))
    assert kinds(effects) == ["Register"]
    assert not d.state.seats_loaded


def test_a_waiting_pod_that_goes_away_leaves_no_entry_behind() -> None:
    d = Driver()
    d.start(pod("w"))
    d.send(m.Registered("w", m.Exhausted("SeatsExhausted: none free", 1)))
    assert d.state.seats["w"].held.count == 1
    effects = d.send(m.PodDeleted("w"))
    assert [f.holder for f in of(effects, m.ForgetSeat)] == ["w"]
    assert d.state.seats == {}


def test_a_terminating_pod_returns_its_seat_while_it_still_exists() -> None:
    d = Driver()
    d.start(pod("a", gated=False), seats={"a": seat("a")})
    terminating = pod("a", gated=False, rv="2")
    terminating["metadata"]["deletionTimestamp"] = "2031-03-04T10:00:00Z"
    (checkin,) = of(d.send(m.PodUpdated(terminating)), m.SeatOp)
    assert checkin.action is SeatAction.CHECK_IN


# --- per-cluster entitlements ------------------------------------------------------------------------

CLUSTER_ONLY = [{"name": "site", "unit": "None", "perCluster": 1}]
BOTH = [{"name": "seats", "perPod": 1}, {"name": "site", "unit": "None", "perCluster": 1}]


def test_per_cluster_entitlements_are_checked_out_once_and_release_every_pod() -> None:
    d = Driver(info(entitlements=CLUSTER_ONLY))
    effects = d.start(pod("a"), pod("b"))
    (cluster,) = of(effects, m.CheckoutCluster)
    assert cluster.count == 1
    assert not of(effects, m.Checkout)  # no per-pod checkout: the product's one is enough
    effects = d.grant("cluster", seat("cluster"))
    assert sorted(w.pod["metadata"]["uid"] for w in of(effects, m.WriteGrant)) == ["a", "b"]
    assert {w.proof.token for w in of(effects, m.WriteGrant)} == {"jws-cluster"}
    # A new pod is released on the same checkout.
    assert kinds(of(d.send(m.PodUpdated(pod("c"))), m.WriteGrant)) == ["WriteGrant"]
    assert not of(d.effects, m.CheckoutCluster)[1:]
    # The last pod gone: the product's seat is checked in.
    d.send(m.PodDeleted("a"))
    d.send(m.PodDeleted("b"))
    (checkin,) = of(d.send(m.PodDeleted("c")), m.SeatOp)
    assert checkin.action is SeatAction.CHECK_IN
    assert checkin.seat.holder == "cluster"


def test_a_refused_per_cluster_checkout_denies_every_pod_and_is_not_retried() -> None:
    d = Driver(info(entitlements=CLUSTER_ONLY))
    d.start(pod("a"))
    effects = d.send(m.Registered("cluster", m.Denied("NoEntitlementsAllowed: no entitlement site")))
    (deny,) = of(effects, m.Deny)
    assert not deny.durable
    assert [e.reason for e in of(effects, m.PostEvent)] == ["ClusterCheckoutDenied"]
    d.advance(timedelta(hours=2))
    assert not of(d.send(m.Due(m.SEATS)), m.CheckoutCluster)
    assert not of(d.send(m.PodUpdated(pod("b"))), m.CheckoutCluster)
    assert d.state.pods["b"].state is EntitlementState.DENIED


def test_a_throttled_per_cluster_checkout_is_retried_on_the_backoff() -> None:
    d = Driver(info(entitlements=CLUSTER_ONLY))
    d.start(pod("a"))
    effects = d.send(m.Registered("cluster", m.Failed("RateLimitExceededException: slow", transient=True)))
    (retry,) = of(effects, m.Schedule)
    assert not of(d.send(m.Due(m.SEATS)), m.CheckoutCluster)  # not before its time
    d.now = retry.at
    assert kinds(of(d.send(m.Due(m.SEATS)), m.CheckoutCluster)) == ["CheckoutCluster"]


def test_with_both_a_pod_needs_its_own_seat_and_the_products() -> None:
    d = Driver(info(entitlements=BOTH))
    effects = d.start(pod("a"))
    assert kinds(of(effects, m.CheckoutCluster)) == ["CheckoutCluster"]
    assert not of(effects, m.Checkout)  # waits for the product's checkout first
    effects = d.grant("cluster", seat("cluster"))
    (own,) = of(effects, m.Checkout)
    assert not of(effects, m.WriteGrant)
    (write,) = of(d.grant("a"), m.WriteGrant)
    assert write.proof.token == "jws-a"
    assert own.count == 1
