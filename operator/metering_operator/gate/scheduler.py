"""One scheduler thread for every product of the process: one inbox, the timers of all of them.

Before, each MeteredProduct's gate controller ran a thread of its own that polled the product five
times a second, drained its own queue and fired its own timers, and each metering product had an
async daemon waking per interval: N products cost N threads and 5N wake-ups a second doing
nothing. Here one :class:`Scheduler` thread steps every *owner* (a product's gate controller, a
product's metering job):

* an **inbox** (a deque: appending is one atomic operation, no lock) into which any thread posts
  ``(owner, message)`` -- pod events from the namespaces' cache threads, worker answers, product
  changes pushed by kopf. A post wakes the thread only when it is not already awake, and one
  wake-up delivers everything that has arrived, up to :data:`BATCH_LIMIT` messages;
* **timers** keyed by (owner, key), in two heaps because there are two kinds of time:
  :meth:`Scheduler.at` takes a time of the injected :class:`~metering_operator.domain.clock.Clock`
  (the gate's retries and renewals; that clock may jump, e.g. the emulator's settable clock, so a
  pending one is looked at again at least every :data:`RECHECK_SECONDS`), :meth:`Scheduler.after`
  a delay on the monotonic clock (status flushes, key refreshes, metering's sampling interval).

Fairness: a wake-up delivers at most :data:`BATCH_LIMIT` messages and then fires the timers that
are due (at most as many) before taking more, so one product's flood of pod events delays another
product's retry by one batch, never starves it. An owner that raises is logged and told
:data:`RECOVER` after :data:`ERROR_BACKOFF_SECONDS`; the others go on. Removing an owner drops its
timers at once, and messages still in the inbox for it are dropped when they come up.

Nothing blocking runs on this thread: owners hand Kubernetes and AWS calls to worker pools, whose
answers come back through the inbox.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from datetime import datetime
from typing import Any, Protocol

from metering_operator.domain.clock import Clock

log = logging.getLogger(__name__)

#: Messages delivered per wake-up before the due timers get their turn.
BATCH_LIMIT = 500
#: A pending timer of the injected clock is compared with that clock at least this often.
RECHECK_SECONDS = 1.0
#: An owner that raised is told RECOVER after this long (as the old per-product loop waited).
ERROR_BACKOFF_SECONDS = 1.0
#: The timer key an owner that raised is called back with.
RECOVER = "__recover__"


class Owner(Protocol):
    """What the scheduler steps. All calls come from the scheduler's thread, one at a time."""

    def started(self) -> None:
        """Added: subscribe, read the product, schedule the first timers."""

    def receive(self, message: Any) -> None:
        """One message posted for this owner (in the order posted by any one thread)."""

    def due(self, key: Hashable) -> None:
        """A timer of this owner came due (or :data:`RECOVER` after it raised)."""

    def stopped(self) -> None:
        """Removed: its timers are already gone; release what it holds."""


class _Control:
    """Lifecycle items of the inbox (kept in order with the messages)."""

    __slots__ = ("add", "done")

    def __init__(self, add: bool, done: Future[None]) -> None:
        self.add = add
        self.done = done


class Scheduler:
    """See the module docstring. ``monotonic`` and ``clock`` are injected for tests."""

    def __init__(
        self,
        clock: Clock,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        batch_limit: int = BATCH_LIMIT,
        name: str = "gate-scheduler",
    ) -> None:
        self.clock = clock
        self.monotonic = monotonic
        self.batch_limit = batch_limit
        self.name = name
        self._inbox: collections.deque[tuple[Owner, Any]] = collections.deque()
        self._wake = threading.Event()
        #: Owners that have been started and not removed, by id (touched on the scheduler thread only).
        self._active: dict[int, Owner] = {}
        #: Owners by the key they were added with (for :meth:`post_to`; changed under the lock).
        self._keys: dict[Hashable, Owner] = {}
        self._seq = itertools.count()
        self._mono: list[tuple[float, int, Owner, Hashable]] = []
        self._wall: list[tuple[datetime, int, Owner, Hashable]] = []
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = False
        #: Counters for the benchmark and tests: wake-ups, messages delivered, timers fired.
        self.wakeups = 0
        self.delivered = 0
        self.fired = 0

    # -- any thread ------------------------------------------------------------------------------

    def post(self, owner: Owner, message: Any) -> None:
        """Hand ``owner`` a message. Never blocks; wakes the thread only if it sleeps."""
        self._inbox.append((owner, message))
        if not self._wake.is_set():
            self._wake.set()

    def post_to(self, key: Hashable, message: Any) -> bool:
        """:meth:`post` to the owner added with ``key``; False (nothing posted) if there is none."""
        owner = self._keys.get(key)
        if owner is None:
            return False
        self.post(owner, message)
        return True

    def add(self, owner: Owner, key: Hashable | None = None) -> Future[None]:
        """Start stepping ``owner`` (its :meth:`Owner.started` runs on the scheduler thread);
        with ``key``, :meth:`post_to` reaches it from now on (a later owner of the key replaces it)."""
        self._ensure_thread()
        if key is not None:
            with self._start_lock:
                self._keys[key] = owner
        return self._control(owner, add=True)

    def remove(self, owner: Owner) -> Future[None]:
        """Stop stepping ``owner``: its timers are dropped and :meth:`Owner.stopped` called; the
        future is done once that has happened (await it with ``asyncio.wrap_future``)."""
        with self._start_lock:
            for key in [k for k, o in self._keys.items() if o is owner]:
                del self._keys[key]
        return self._control(owner, add=False)

    def start(self) -> None:
        self._ensure_thread()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _control(self, owner: Owner, add: bool) -> Future[None]:
        done: Future[None] = Future()
        self.post(owner, _Control(add, done))
        thread = self._thread
        if self._stopping and (thread is None or not thread.is_alive()):
            self._drain_controls()  # no thread to do it (the operator is shutting down)
        return done

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    # -- the scheduler's thread (and owners' calls during their steps) ----------------------------

    def at(self, owner: Owner, when: datetime, key: Hashable) -> None:
        """Call ``owner.due(key)`` once the injected clock reads ``when`` or later."""
        heapq.heappush(self._wall, (when, next(self._seq), owner, key))

    def after(self, owner: Owner, seconds: float, key: Hashable) -> None:
        """Call ``owner.due(key)`` after ``seconds`` of monotonic time."""
        heapq.heappush(self._mono, (self.monotonic() + seconds, next(self._seq), owner, key))

    def pending(self, owner: Owner | None = None) -> int:
        """Timers waiting (of ``owner``, or of all)."""
        entries = [*self._mono, *self._wall]
        return len(entries) if owner is None else sum(1 for e in entries if e[2] is owner)

    def next_wait(self) -> float | None:
        """Seconds until the next timer needs looking at; None when there is none."""
        wait: float | None = None
        if self._mono:
            wait = max(0.0, self._mono[0][0] - self.monotonic())
        if self._wall:
            until = (self._wall[0][0] - self.clock.now()).total_seconds()
            until = max(0.0, min(until, RECHECK_SECONDS))
            wait = until if wait is None else min(wait, until)
        return wait

    def run_once(self) -> bool:
        """One wake-up's work: deliver a batch from the inbox, then fire the due timers.
        True when work is left over (the inbox or due timers beyond the batch limit)."""
        self.wakeups += 1
        inbox = self._inbox
        for _ in range(min(len(inbox), self.batch_limit)):
            owner, message = inbox.popleft()
            if isinstance(message, _Control):
                self._lifecycle(owner, message)
            elif id(owner) in self._active:
                self.delivered += 1
                self._call(owner, owner.receive, message)
        more = self._fire()
        return more or bool(inbox)

    def _fire(self) -> bool:
        fired = 0
        if self._mono:
            now = self.monotonic()
            while self._mono and self._mono[0][0] <= now and fired < self.batch_limit:
                _, _, owner, key = heapq.heappop(self._mono)
                fired += self._due(owner, key)
        if self._wall:
            now_at = self.clock.now()
            while self._wall and self._wall[0][0] <= now_at and fired < self.batch_limit:
                _, _, owner, key = heapq.heappop(self._wall)
                fired += self._due(owner, key)
        return fired >= self.batch_limit

    def _due(self, owner: Owner, key: Hashable) -> int:
        if id(owner) not in self._active:
            return 0
        self.fired += 1
        self._call(owner, owner.due, key)
        return 1

    def _lifecycle(self, owner: Owner, control: _Control) -> None:
        try:
            if control.add:
                if id(owner) not in self._active:
                    self._active[id(owner)] = owner
                    self._call(owner, owner.started)
            elif id(owner) in self._active:
                del self._active[id(owner)]
                self._drop_timers(owner)
                try:
                    owner.stopped()
                except Exception:
                    log.exception("stopping %r failed", owner)
        finally:
            # Cancelled when the awaiting kopf daemon was (asyncio.wrap_future passes that on);
            # the lifecycle step has been carried out all the same.
            if not control.done.done():
                control.done.set_result(None)

    def _drop_timers(self, owner: Owner) -> None:
        # Removals are rare (a product deleted): rebuilding the heaps is cheaper than tombstones.
        self._mono = [e for e in self._mono if e[2] is not owner]
        heapq.heapify(self._mono)
        self._wall = [e for e in self._wall if e[2] is not owner]
        heapq.heapify(self._wall)

    def _call(self, owner: Owner, method: Callable[..., None], *args: Any) -> None:
        try:
            method(*args)
        except Exception:
            # One product's bad object or failed call must not stop the others' gates.
            log.exception("%r failed; it is called again in %.0fs", owner, ERROR_BACKOFF_SECONDS)
            if id(owner) in self._active:
                self.after(owner, ERROR_BACKOFF_SECONDS, RECOVER)

    def _run(self) -> None:
        wake = self._wake
        while not self._stopping:
            more = False
            try:
                more = self.run_once()
            except Exception:  # the scheduler's own bug: keep the other products going
                log.exception("gate scheduler step failed; continuing")
            if more or self._inbox:
                continue
            wait = self.next_wait()
            # Cleared before the inbox is looked at again: a post after this sets it anew.
            wake.wait(wait)
            wake.clear()
        self._drain_controls()

    def _drain_controls(self) -> None:
        """Stopped: removals still waiting are carried out, additions refused, so no kopf daemon
        waits on a future that would never be done."""
        while self._inbox:
            owner, message = self._inbox.popleft()
            if isinstance(message, _Control):
                if message.add:
                    if not message.done.done():
                        message.done.set_result(None)
                else:
                    self._lifecycle(owner, message)
