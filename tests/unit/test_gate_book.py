"""The gate machine's indexes (gate/book.py): the dispatcher's queue, the seat queue, the tallies,
and the ownership rule that lets a step update them in place.

Driven through ``step`` like tests/unit/test_gate_machine.py, with a fake clock; the queue is also
read directly (``Book.waiting``) to prove what it holds.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.domain import entitlement as ent
from metering_operator.domain.license_seats import SeatAction
from metering_operator.domain.product import ANNOTATION_ENTITLEMENT, EntitlementState
from metering_operator.gate import machine
from metering_operator.gate import model as m
from metering_operator.gate.book import StaleState
from tests.unit import test_gate_seats as seats
from tests.unit.test_gate_machine import T0, Driver, info, kinds, pod


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def registered(effects: list[m.Effect]) -> list[str]:
    return [str(e.pod["metadata"]["uid"]) for e in effects if isinstance(e, m.Register)]


def test_pods_waiting_for_a_slot_start_in_the_order_they_came(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), max_inflight=2)
    d.list()
    started: list[str] = []
    for i in range(6):
        started += registered(d.send(m.PodUpdated(pod(f"p{i}"))))
    assert started == ["p0", "p1"]
    assert d.state.book.waiting() == ["p2", "p3", "p4", "p5"]
    # Each answer frees one slot: the oldest waiting pod takes it.
    assert registered(d.send(m.Registered("p1", m.Granted("t1", T0)))) == ["p2"]
    assert registered(d.send(m.Registered("p0", m.Granted("t0", T0)))) == ["p3"]
    assert d.state.book.waiting() == ["p4", "p5"]
    assert d.state.inflight == 2


def test_a_burst_never_exceeds_the_cap_and_registers_every_pod_once_in_order(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), max_inflight=16)
    uids = [f"p{i:04d}" for i in range(2000)]
    first = registered(d.list(*[pod(uid) for uid in uids]))
    assert first == uids[:16]
    assert len(d.state.book.waiting()) == 2000 - 16
    order = list(first)
    inflight = list(first)
    while inflight:
        uid = inflight.pop(0)
        more = registered(d.send(m.Registered(uid, m.Granted(f"t-{uid}", T0))))
        assert len(more) <= 1
        inflight += more
        order += more
        assert d.state.inflight == len(inflight) <= 16
    assert order == uids  # each pod exactly once, oldest first
    assert d.state.book.waiting() == []


def test_a_pod_deleted_while_queued_leaves_the_queue_and_is_never_registered(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), max_inflight=1)
    d.list(pod("a"), pod("b"), pod("c"))
    assert d.state.book.waiting() == ["b", "c"]
    d.send(m.PodDeleted("b"))
    assert d.state.book.waiting() == ["c"]
    assert "b" not in d.state.pods
    assert registered(d.send(m.Registered("a", m.Granted("ta", T0)))) == ["c"]
    assert d.state.book.waiting() == []
    assert registered(d.effects).count("b") == 0


def test_a_retry_whose_backoff_ran_out_goes_first_even_before_its_timer(key: rsa.RSAPrivateKey) -> None:
    """As the walk over every pod did: a throttled older pod is taken before newer waiting ones as
    soon as its backoff has run out, whether or not its timer's message came yet."""
    d = Driver(info(key), max_inflight=1)
    d.list(pod("old"), pod("new1"), pod("new2"))
    effects = d.send(m.Registered("old", m.Failed("ThrottlingException: slow down", transient=True)))
    (retry,) = [e for e in effects if isinstance(e, m.Schedule)]
    assert registered(effects) == ["new1"]
    d.send(m.Written("old", pod("old", notes={ANNOTATION_ENTITLEMENT: "Pending"}, rv="2")))  # its Pending
    d.now = retry.at  # the timer is due, but its Due has not arrived
    assert registered(d.send(m.Registered("new1", m.Granted("t", T0)))) == ["old"]
    assert d.send(m.Due("old")) == []  # the timer finds the pod busy: nothing twice
    assert d.state.book.waiting() == ["new2"]


def test_seat_waiters_get_a_freed_seat_oldest_first() -> None:
    d = seats.Driver()
    times = {"a": "09:00", "w1": "09:01", "w2": "09:02", "w3": "09:03"}
    pods = {uid: seats.pod(uid, created=f"2031-03-04T{t}:00Z") for uid, t in times.items()}
    d.start(*pods.values())
    d.grant("a")
    # w3 asks last but is answered first: the queue is by age, not by who waited longest here.
    for uid in ("w3", "w1", "w2"):
        d.send(m.Registered(uid, m.Exhausted("SeatsExhausted: none free", 1)))
        d.send(m.Written(uid, seats.pod(uid, rv="2", created=pods[uid]["metadata"]["creationTimestamp"])))
    assert list(d.state.book.seat_waiters) == ["w3", "w1", "w2"]
    assert d.state.exhausted() == 3
    (checkin,) = seats.of(d.send(m.PodDeleted("a")), m.SeatOp)
    assert checkin.seat.holder == "a"
    effects = d.send(m.SeatDone("a", SeatAction.CHECK_IN))
    assert [c.pod["metadata"]["uid"] for c in seats.of(effects, m.Checkout)] == ["w1"]
    # The others wait on: w2 and w3 are behind w1, newest last.
    assert d.state.pods["w2"].reason.startswith(m.SEATS_EXHAUSTED)
    assert d.state.pods["w3"].reason.startswith(m.SEATS_EXHAUSTED)
    d.grant("w1")
    assert list(d.state.book.seat_waiters) == ["w3", "w2"]


def test_the_tallies_equal_a_count_of_every_pod(key: rsa.RSAPrivateKey) -> None:
    d = Driver(info(key), max_inflight=16)
    d.list(*[pod(f"p{i}") for i in range(8)], pod("run", gated=False))
    d.send(m.Registered("p0", m.Granted("t0", T0)))
    d.send(m.Registered("p1", m.Denied("CustomerNotEntitledException")))
    d.send(m.Registered("p2", m.Failed("AccessDenied: no role", transient=False)))
    gone = pod("p3")
    gone["metadata"]["deletionTimestamp"] = T0.isoformat()
    d.send(m.PodUpdated(gone))
    d.send(m.PodDeleted("p4"))
    live = [r for r in d.state.pods.values() if not ent.is_terminating(r.pod)]
    assert d.state.counts() == ent.count_pods(r.state for r in live)
    assert d.state.counts().denied == 1
    assert d.state.counts().registered == 1
    held = {"waiting": 0, "Pending": 0, "Denied": 0, "Error": 0}
    for r in live:
        if r.granted is None and ent.is_gated(r.pod):
            held[r.state.value if r.state is not None else "waiting"] += 1
    assert d.state.held() == held
    assert held["Denied"] == 1
    assert held["Error"] == 1
    assert d.state.ungated() == sum(1 for r in d.state.pods.values() if r.ungated) == 1
    assert [r.uid for r in d.state.live()] == [r.uid for r in live]


def test_a_stepped_state_is_spent_and_stepping_it_again_is_refused(key: rsa.RSAPrivateKey) -> None:
    """The ownership rule: a step updates the pods in place, so only the state it returns goes on."""
    d = Driver(info(key))
    d.list()
    before = d.state
    d.send(m.PodUpdated(pod("a")))
    with pytest.raises(StaleState):
        machine.step(before, m.PodUpdated(pod("b")), d.now)
    # The refused step changed nothing: the state the step returned goes on.
    assert list(d.state.pods) == ["a"]
    assert kinds(d.send(m.PodUpdated(pod("b")))) == ["Register"]
    assert d.state.pods["a"].state is None
    assert d.state.pods["b"].busy is m.Busy.REGISTER


def test_evolve_refuses_a_name_that_is_not_a_field() -> None:
    record = m.PodRecord("u", pod("u"))
    assert m.evolve(record, attempts=2).attempts == 2
    assert record.attempts == 0  # the old record is untouched
    with pytest.raises(TypeError, match="attempt"):
        m.evolve(record, attempt=2)


def test_a_pod_held_for_a_seat_keeps_its_order_after_a_relist() -> None:
    """A new list is the pods' order from then on; the queue follows it."""
    d = seats.Driver(max_inflight=1)
    d.start(seats.pod("x", created="2031-03-04T09:00:00Z"), seats.pod("y", created="2031-03-04T09:01:00Z"))
    assert d.state.book.waiting() == ["y"]
    d.send(m.Listed((seats.pod("y", created="2031-03-04T09:01:00Z"),), {}))
    assert d.state.book.waiting() == []  # x is gone from the list, its slot freed, y started
    assert d.state.pods["y"].busy is m.Busy.REGISTER
    assert d.state.pods["y"].state is not EntitlementState.GRANTED


def test_a_step_that_raises_changes_nothing(key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller logs a failed step and goes on from the state it had: the step's changes to
    the shared book are undone, so no pod is left marked busy for a Register never carried out."""
    d = Driver(info(key), max_inflight=2)
    d.list(pod("a"), pod("b"), pod("c"), pod("d"))
    before = {uid: r for uid, r in d.state.pods.items()}
    waiting, inflight = d.state.book.waiting(), d.state.inflight
    calls = 0
    consider = machine._consider

    def flaky(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug in the middle of a step")
        return consider(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(machine, "_consider", flaky)
    with pytest.raises(RuntimeError):
        # Granted: a's grant is written (1st look), then b... the 2nd look raises.
        d.send(m.Registered("a", m.Granted("ta", T0)))
    monkeypatch.setattr(machine, "_consider", consider)
    assert dict(d.state.pods) == before
    assert d.state.book.waiting() == waiting
    assert d.state.inflight == inflight
    assert d.state.counts() == ent.count_pods(r.state for r in before.values())
    # The same state goes on: the answer is taken again, the grant written, c started.
    effects = d.send(m.Registered("a", m.Granted("ta", T0)))
    assert kinds(effects) == ["WriteGrant", "Register"]
    assert registered(effects) == ["c"]
    assert d.state.book.waiting() == ["d"]


def test_a_seat_review_that_raises_changes_neither_pods_nor_seats(monkeypatch: pytest.MonkeyPatch) -> None:
    d = seats.Driver()
    d.start(seats.pod("a"), seats.pod("b"))
    d.grant("a")
    d.grant("b")
    pods_before, seats_before = dict(d.state.pods), dict(d.state.seats)

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a bug in the seat review")

    monkeypatch.setattr(machine, "plan_seats", broken)
    with pytest.raises(RuntimeError):
        d.send(m.PodDeleted("a"))
    monkeypatch.undo()
    assert dict(d.state.pods) == pods_before
    assert dict(d.state.seats) == seats_before
    # Taken again, the deletion checks a's seat in (the review looks at every holder once more).
    (checkin,) = seats.of(d.send(m.PodDeleted("a")), m.SeatOp)
    assert (checkin.action, checkin.seat.holder) == (SeatAction.CHECK_IN, "a")
    assert list(d.state.pods) == ["b"]
