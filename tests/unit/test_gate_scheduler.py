"""The one scheduler thread of the gate and metering: timers, batches, fairness, removal, failures.

Driven with injected clocks (a fake monotonic clock and a ManualClock) through
:meth:`Scheduler.run_once`, one wake-up's work, so nothing here waits for time to pass; the last
tests run the real thread and wait on Events the owners set.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from metering_operator.domain.clock import ManualClock
from metering_operator.gate.scheduler import ERROR_BACKOFF_SECONDS, RECHECK_SECONDS, RECOVER, Scheduler

T0 = datetime(2031, 3, 4, 10, 0, tzinfo=UTC)


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """An owner that records what it is told, in one shared log of (owner, what, value)."""

    def __init__(self, name: str, log: list[tuple[str, str, Any]], fail_on: Any = None) -> None:
        self.name = name
        self.log = log
        self.fail_on = fail_on
        self.stopped_called = threading.Event()
        self.got = threading.Event()

    def started(self) -> None:
        self.log.append((self.name, "started", None))

    def receive(self, message: Any) -> None:
        self.log.append((self.name, "receive", message))
        self.got.set()
        if message == self.fail_on:
            raise RuntimeError(f"{self.name} fails on {message!r}")

    def due(self, key: Hashable) -> None:
        self.log.append((self.name, "due", key))
        self.got.set()
        if key == self.fail_on:
            raise RuntimeError(f"{self.name} fails on {key!r}")

    def stopped(self) -> None:
        self.log.append((self.name, "stopped", None))
        self.stopped_called.set()


@pytest.fixture
def mono() -> FakeMonotonic:
    return FakeMonotonic()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
def sched(mono: FakeMonotonic, clock: ManualClock) -> Scheduler:
    # Never started as a thread here: run_once is one wake-up's work, called by the test.
    return Scheduler(clock, monotonic=mono, batch_limit=100)


def added(sched: Scheduler, *owners: Recorder) -> None:
    for owner in owners:
        sched._control(owner, add=True)  # what add() posts, without starting the thread
    sched.run_once()


def dues(log: list[tuple[str, str, Any]]) -> list[tuple[str, Any]]:
    return [(name, value) for name, what, value in log if what == "due"]


def test_timers_of_both_clocks_fire_in_time_order_and_not_before(
    sched: Scheduler, mono: FakeMonotonic, clock: ManualClock
) -> None:
    log: list[tuple[str, str, Any]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    added(sched, a, b)
    sched.after(a, 3.0, "a-mono-3")
    sched.after(b, 1.0, "b-mono-1")
    sched.at(b, T0 + timedelta(seconds=2), "b-clock-2")
    sched.at(a, T0 + timedelta(seconds=4), "a-clock-4")
    assert sched.pending() == 4
    assert sched.next_wait() == pytest.approx(1.0)

    sched.run_once()
    assert dues(log) == []  # nothing due yet
    for step in range(1, 5):
        mono.now += 1.0
        clock.advance(timedelta(seconds=1))
        sched.run_once()
        assert len(dues(log)) == step
    assert dues(log) == [("b", "b-mono-1"), ("b", "b-clock-2"), ("a", "a-mono-3"), ("a", "a-clock-4")]
    assert sched.pending() == 0
    assert sched.next_wait() is None


def test_a_clock_timer_follows_a_jump_of_the_injected_clock(
    sched: Scheduler, mono: FakeMonotonic, clock: ManualClock
) -> None:
    """The gate's retries are in the injected clock's time (the emulator's clock can be moved by
    hours): a pending one is looked at again within RECHECK_SECONDS, and fires once the clock
    has passed it, however little monotonic time went by."""
    log: list[tuple[str, str, Any]] = []
    a = Recorder("a", log)
    added(sched, a)
    sched.at(a, T0 + timedelta(hours=1), "renew")
    assert sched.next_wait() == RECHECK_SECONDS  # not an hour: the clock may jump meanwhile
    sched.run_once()
    assert dues(log) == []
    clock.advance(timedelta(hours=1, seconds=1))  # a jump: no monotonic time passed
    sched.run_once()
    assert dues(log) == [("a", "renew")]


def test_one_wake_up_delivers_a_batch_in_order(sched: Scheduler) -> None:
    log: list[tuple[str, str, Any]] = []
    a = Recorder("a", log)
    added(sched, a)
    wakeups = sched.wakeups
    for i in range(80):
        sched.post(a, i)
    assert sched._wake.is_set()
    more = sched.run_once()
    assert not more
    assert sched.wakeups == wakeups + 1
    assert [value for _, what, value in log if what == "receive"] == list(range(80))


def test_one_products_flood_does_not_starve_anothers_timer(sched: Scheduler, mono: FakeMonotonic) -> None:
    log: list[tuple[str, str, Any]] = []
    flood, quiet = Recorder("flood", log), Recorder("quiet", log)
    added(sched, flood, quiet)
    sched.after(quiet, 0.5, "retry")
    for i in range(1000):  # ten batches' worth
        sched.post(flood, i)
    mono.now += 1.0
    more = sched.run_once()
    assert more  # the flood is not done...
    received = [v for n, what, v in log if n == "flood" and what == "receive"]
    assert len(received) == sched.batch_limit
    assert dues(log) == [("quiet", "retry")]  # ...but the other product's retry has fired
    while sched.run_once():
        pass
    assert len([v for n, what, v in log if n == "flood" and what == "receive"]) == 1000


def test_removing_an_owner_drops_its_timers_and_its_undelivered_messages(
    sched: Scheduler, mono: FakeMonotonic, clock: ManualClock
) -> None:
    log: list[tuple[str, str, Any]] = []
    gone, kept = Recorder("gone", log), Recorder("kept", log)
    added(sched, gone, kept)
    sched.after(gone, 1.0, "mono")
    sched.at(gone, T0 + timedelta(seconds=1), "clock")
    sched.after(kept, 1.0, "mono")
    done = sched.remove(gone)
    sched.post(gone, "after removal")  # e.g. a worker's late answer
    sched.run_once()
    assert done.done()
    assert gone.stopped_called.is_set()
    assert sched.pending(gone) == 0
    assert sched.pending() == 1
    mono.now += 2.0
    clock.advance(timedelta(seconds=2))
    sched.run_once()
    assert dues(log) == [("kept", "mono")]
    assert ("gone", "receive", "after removal") not in log


def test_post_to_reaches_the_owner_of_a_key_until_it_is_removed(sched: Scheduler) -> None:
    log: list[tuple[str, str, Any]] = []
    a = Recorder("a", log)
    sched._keys[("gate", "ns", "a")] = a  # what add(owner, key) records on the calling thread
    added(sched, a)
    assert sched.post_to(("gate", "ns", "a"), "changed")
    assert not sched.post_to(("gate", "ns", "other"), "changed")
    sched.run_once()
    sched.remove(a)
    assert not sched.post_to(("gate", "ns", "a"), "changed")
    sched.run_once()
    assert [v for _, what, v in log if what == "receive"] == ["changed"]


def test_an_owner_that_raises_does_not_stop_the_others_and_is_called_again(
    sched: Scheduler, mono: FakeMonotonic
) -> None:
    log: list[tuple[str, str, Any]] = []
    bad, good = Recorder("bad", log, fail_on="boom"), Recorder("good", log, fail_on="never")
    added(sched, bad, good)
    sched.post(bad, "boom")
    sched.post(good, "hello")
    sched.after(good, 0.0, "tick")
    sched.run_once()
    assert ("good", "receive", "hello") in log
    assert ("good", "due", "tick") in log
    assert ("bad", "due", RECOVER) not in log
    mono.now += ERROR_BACKOFF_SECONDS
    sched.run_once()
    assert ("bad", "due", RECOVER) in log  # looked at again, as the old per-product loop did


def test_the_thread_sleeps_until_posted_to_and_removal_waits_for_stopped(clock: ManualClock) -> None:
    sched = Scheduler(clock, name="test-scheduler")
    log: list[tuple[str, str, Any]] = []
    a = Recorder("a", log)
    try:
        sched.add(a, key="a").result(timeout=5)
        assert [t.name for t in threading.enumerate()].count("test-scheduler") == 1
        wakeups = sched.wakeups
        sched.post_to("a", "hello")
        assert a.got.wait(5)
        assert ("a", "receive", "hello") in log
        assert sched.wakeups <= wakeups + 2  # one post, one wake-up (and at most one spurious)
        sched.remove(a).result(timeout=5)
        assert a.stopped_called.is_set()
    finally:
        sched.stop()
    assert sched._thread is not None
    assert not sched._thread.is_alive()


def test_many_owners_share_one_thread(clock: ManualClock) -> None:
    sched = Scheduler(clock, name="test-scheduler-many")
    log: list[tuple[str, str, Any]] = []
    owners = [Recorder(f"p{i}", log) for i in range(50)]
    before = threading.active_count()
    try:
        for owner in owners:
            sched.add(owner).result(timeout=5)
        assert threading.active_count() == before + 1
        for owner in owners:
            sched.post(owner, "x")
        for owner in owners:
            assert owner.got.wait(5)
    finally:
        sched.stop()


def test_stopping_completes_a_removal_still_in_the_inbox(clock: ManualClock) -> None:
    sched = Scheduler(clock, name="test-scheduler-stop")
    log: list[tuple[str, str, Any]] = []
    a = Recorder("a", log)
    sched.add(a).result(timeout=5)
    sched.stop()
    done = sched.remove(a)  # a kopf daemon ending after the scheduler stopped
    assert done.done()
    assert a.stopped_called.is_set()


# --- metering's sampling cycles on the scheduler -------------------------------------------------


class ManualPool:
    """A cycle pool whose work runs when the test says (a cycle 'in flight' until then)."""

    def __init__(self) -> None:
        self.work: list[tuple[Any, Any]] = []

    def submit(self, fn: Any) -> Any:
        from concurrent.futures import Future

        future: Future[None] = Future()
        self.work.append((fn, future))
        return future

    def finish_one(self) -> None:
        fn, future = self.work.pop(0)
        fn()
        future.set_result(None)


def test_metering_cycles_never_overlap_and_are_timed_from_the_end_of_the_last(
    sched: Scheduler, mono: FakeMonotonic, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from metering_operator.handlers import metering

    cycles: list[str] = []
    monkeypatch.setattr(metering, "run_cycle", lambda rt, ns, name: cycles.append(f"{ns}/{name}"))
    pool = ManualPool()
    rt: Any = SimpleNamespace(cycle_pool=pool)
    job = metering.MeteringJob(rt, sched, "ns", "db", interval=lambda: 10.0, first=2.0)
    sched._control(job, add=True)
    sched.run_once()
    mono.now += 2.0
    sched.run_once()
    assert len(pool.work) == 1  # due: handed to the pool, not run on the scheduler's thread
    assert cycles == []
    # The cycle takes long: a RECOVER or a stray timer while it runs starts no second one.
    sched.after(job, 0.0, metering.CYCLE)
    mono.now += 30.0
    sched.run_once()
    assert len(pool.work) == 1
    pool.finish_one()
    assert cycles == ["ns/db"]
    sched.run_once()  # its CYCLE_DONE: the next one in 10 s from now
    assert job.running is None
    mono.now += 9.9
    sched.run_once()
    assert pool.work == []
    mono.now += 0.2
    sched.run_once()
    assert len(pool.work) == 1
    # Removed while a cycle is in flight: its future is kept for the daemon to wait on, and no
    # cycle is started any more.
    done = sched.remove(job)
    sched.run_once()
    assert done.done()
    assert job.running is not None
    assert not job.running.done()
    pool.finish_one()
    sched.run_once()
    mono.now += 100.0
    sched.run_once()
    assert pool.work == []
    assert cycles == ["ns/db", "ns/db"]


def test_a_cancelled_wait_for_removal_still_removes(sched: Scheduler) -> None:
    """kopf cancels a daemon that takes too long to stop; asyncio.wrap_future then cancels the
    removal's future. The removal is carried out all the same, and the scheduler goes on."""
    log: list[tuple[str, str, Any]] = []
    a, b = Recorder("a", log), Recorder("b", log)
    added(sched, a, b)
    done = sched.remove(a)
    assert done.cancel()
    sched.post(b, "after")
    sched.run_once()
    assert a.stopped_called.is_set()
    assert ("b", "receive", "after") in log
