"""The gate state's pod map and the indexes kept beside it, so a step costs O(log n), not O(pods).

A product's :class:`~metering_operator.gate.model.GateState` holds one :class:`Book`: every pod's
:class:`~metering_operator.gate.model.PodRecord` and, kept up to date by :meth:`Book.put` on every
change of a record, what the machine used to find by walking every pod on every message:

* ``ready``: the pods the registration dispatcher may start (idle, neither granted nor denied, no
  retry pending), taken in the pods' order (first seen, or the last list's) -- the order in which
  walking the pod map met them -- from a heap of ``(order, uid)``;
* a heap of pending retries ``(retry_at, order, uid)``: a pod whose backoff has run out joins
  ``ready`` when the dispatcher next runs, even before its timer's message arrives;
* the pods waiting for a License Manager seat, and two min-heaps keyed like the seat queue
  (``(running first, age, name)``): seat waiters and running pods not answered yet, so "is anyone
  ahead of this pod" is a look at the top of a heap;
* the live (not terminating), not denied pods (the holders a contract product needs a seat for);
* a tally of the pods by what the status and the gauges count, so a status flush reads counters;
* contract products' seats (holder -> Seat) with what the seat review needs to look at only the
  holders that can have something to do: the holders changed since the last review (their seat,
  or whether a pod needs one), a heap of the moments a seat's answer changes by itself (its retry,
  its extension being due, its lapse), and a min-heap of each seat's next review time.

**Ownership.** The book is mutable and owned by the one chain of states its controller steps: a
step updates it in place and returns a state that shares it. A state that has been stepped is
spent: :func:`~metering_operator.gate.machine.step` refuses it (:class:`StaleState`), so nothing can
go on from an old state and silently share the new one's pods. A step that raises changes nothing,
as before: every change during a step is journaled and undone (:meth:`Book.rollback`), so the
controller's loop, which logs the error and goes on, goes on from the pods as they were (no pod
marked busy for an effect that was never carried out). Heaps use lazy deletion: an entry
whose uid no longer has that key is skipped, and a heap is rebuilt when stale entries outnumber
live ones.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from metering_operator.domain import entitlement as ent
from metering_operator.domain.license_seats import CLUSTER_HOLDER, EXTEND_WITHIN
from metering_operator.domain.product import CheckoutType, EntitlementState

if TYPE_CHECKING:
    from metering_operator.gate.model import PodRecord, Seat

#: ``(gated, creationTimestamp, name)``: who checks out first when seats are short.
QueueKey = tuple[bool, str, str]


class StaleState(RuntimeError):
    """A gate state that has been stepped already was stepped again (it shares its book)."""


class Tally(NamedTuple):
    """What one pod adds to the counters the status and the gauges read."""

    live: bool
    state: EntitlementState | None
    ungated: bool
    #: Live, waiting for a seat (a state and a SeatsExhausted reason, neither granted nor denied).
    exhausted: bool
    #: Live, behind the gate and not granted (the held gauge).
    held: bool


def queue_key(record: PodRecord) -> QueueKey:
    meta = record.pod.get("metadata", {})
    return ent.is_gated(record.pod), str(meta.get("creationTimestamp") or ""), str(meta.get("name") or "")


class _KeyHeap:
    """A min-heap of ``(key, uid)`` with one current key per uid (lazy deletion)."""

    __slots__ = ("heap", "keys")

    def __init__(self) -> None:
        self.heap: list[tuple[Any, str]] = []
        self.keys: dict[str, Any] = {}

    def set(self, uid: str, key: Any) -> None:
        if self.keys.get(uid) == key:
            return
        self.keys[uid] = key
        heapq.heappush(self.heap, (key, uid))
        if len(self.heap) > 2 * len(self.keys) + 64:
            self.heap = [(k, u) for u, k in self.keys.items()]
            heapq.heapify(self.heap)

    def discard(self, uid: str) -> None:
        self.keys.pop(uid, None)

    def _clean(self) -> None:
        heap, keys = self.heap, self.keys
        while heap and keys.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def pop(self) -> str | None:
        """The uid with the smallest key, taken out."""
        self._clean()
        if not self.heap:
            return None
        _, uid = heapq.heappop(self.heap)
        del self.keys[uid]
        return uid

    def min_other(self, uid: str) -> Any:
        """The smallest key of any uid but ``uid`` (None: there is none)."""
        heap, keys = self.heap, self.keys
        own: tuple[Any, str] | None = None
        while heap:
            key, top = heap[0]
            if keys.get(top) != key:
                heapq.heappop(heap)
            elif top == uid:
                own = heapq.heappop(heap)
            else:
                break
        found = heap[0][0] if heap else None
        if own is not None:
            heapq.heappush(heap, own)
        return found


class Book:
    """The pods of one product and their indexes (see the module's docstring)."""

    def __init__(self) -> None:
        #: Bumped by every step: a state whose version is behind its book's has been stepped.
        self.version = 0
        #: During a step: how to undo each change (see :meth:`rollback`).
        self._journal: list[tuple[str, str, Any, Any]] | None = None
        self._saved: tuple[int, tuple[Any, ...] | None] = (0, None)
        self.next_order = 0
        self._reset()
        self._reset_seats()

    def _reset(self) -> None:
        #: uid -> record, in the pods' order (first seen, or the last list's).
        self.pods: dict[str, PodRecord] = {}
        self.order: dict[str, int] = {}
        #: RegisterUsage / CheckoutLicense calls in flight for the product.
        self.inflight = 0
        self.ready = _KeyHeap()
        #: Ready pods the dispatcher looked at and left idle: they wait for something other than a
        #: slot, and go back to ``ready`` when a message about them, a look at every pod, or a new
        #: seat of the product's per-cluster checkout (whose lapse alone can block them) comes.
        self.parked: dict[str, None] = {}
        self.retries: list[tuple[datetime, int, str]] = []
        #: Pods waiting for a License Manager seat (uid -> None, in the order they began to wait).
        self.seat_waiters: dict[str, None] = {}
        self.seat_queue = _KeyHeap()
        self.running = _KeyHeap()
        #: Live, not denied pods: the holders a contract product needs a seat for.
        self.needed: dict[str, None] = {}
        self.tallies: dict[str, Tally] = {}
        self.tally: Counter[Tally] = Counter()

    def _reset_seats(self) -> None:
        #: Contract products: each holder's seat (pod uid or the cluster holder -> Seat).
        self.seats: dict[str, Seat] = {}
        self.seat_order: dict[str, int] = {}
        self.next_seat_order = 0
        #: Holders whose seat, or whose pod's need of one, changed since the last review.
        self.seat_dirty: set[str] = set()
        #: ``(moment, holder)``: when a seat's review answer changes without any message.
        self.seat_times: list[tuple[datetime, str]] = []
        #: Each holder's next review time (what the review schedules its timer at).
        self.seat_next = _KeyHeap()
        #: What the last review assumed of the product (another: every holder is looked at).
        self.seat_basis: tuple[Any, ...] | None = None

    # --- the one way a record changes -------------------------------------------------------

    def put(self, record: PodRecord, order: int | None = None) -> None:
        uid = record.uid
        if self._journal is not None:
            self._journal.append(("pod", uid, self.pods.get(uid), self.order.get(uid)))
        if uid not in self.pods:
            if order is None:
                order = self.next_order
                self.next_order += 1
            self.order[uid] = order
        self.pods[uid] = record
        order = self.order[uid]
        self.parked.pop(uid, None)
        idle = record.busy is None and record.granted is None and record.denied is None
        if idle and record.retry_at is None:
            self.ready.set(uid, order)
        else:
            self.ready.discard(uid)
            if idle and record.retry_at is not None:
                heapq.heappush(self.retries, (record.retry_at, order, uid))
        live = not ent.is_terminating(record.pod)
        waits = record.waits_for_seat
        if waits:
            self.seat_waiters[uid] = None
        else:
            self.seat_waiters.pop(uid, None)
        if waits and live:
            self.seat_queue.set(uid, queue_key(record))
        else:
            self.seat_queue.discard(uid)
        unanswered = record.granted is None and record.denied is None
        gated = ent.is_gated(record.pod)
        if (
            live
            and unanswered
            and not gated
            and (record.waiting is None or record.waiting is EntitlementState.PENDING)
        ):
            self.running.set(uid, queue_key(record))
        else:
            self.running.discard(uid)
        needed = live and record.denied is None
        if needed != (uid in self.needed):
            if needed:
                self.needed[uid] = None
            else:
                del self.needed[uid]
            if uid in self.seats:
                self.seat_dirty.add(uid)
        state = record.state
        tally = Tally(
            live=live,
            state=state,
            ungated=record.ungated,
            exhausted=live and waits and state is not None,
            held=live and record.granted is None and gated,
        )
        previous = self.tallies.get(uid)
        if previous != tally:
            if previous is not None:
                self.tally[previous] -= 1
            self.tally[tally] += 1
            self.tallies[uid] = tally

    def remove(self, uid: str) -> PodRecord | None:
        record = self.pods.pop(uid, None)
        if record is None:
            return None
        if self._journal is not None:
            self._journal.append(("pod", uid, record, self.order[uid]))
        del self.order[uid]
        self.ready.discard(uid)
        self.parked.pop(uid, None)
        self.seat_waiters.pop(uid, None)
        self.seat_queue.discard(uid)
        self.running.discard(uid)
        if self.needed.pop(uid, 0) is None and uid in self.seats:
            self.seat_dirty.add(uid)
        tally = self.tallies.pop(uid)
        self.tally[tally] -= 1
        return record

    def clear(self) -> None:
        """Forget every pod (a new list follows); the version, the order counter and the seats go
        on (the next seat review looks at every holder)."""
        if self._journal is not None:
            self._journal.append(("pods", "", dict(self.pods), dict(self.order)))
        self._reset()
        self.seat_basis = None

    # --- seats ------------------------------------------------------------------------------

    def set_seat(self, holder: str, seat: Seat) -> None:
        if self._journal is not None:
            self._journal.append(("seat", holder, self.seats.get(holder), self.seat_order.get(holder)))
        if holder == CLUSTER_HOLDER and self.parked:
            # The product's per-cluster lease can make parked pods go on (it lapses by time alone,
            # and comes back only here): the dispatcher looks at them again, in their order.
            for uid in self.parked:
                self.ready.set(uid, self.order[uid])
            self.parked = {}
        if holder not in self.seats:
            self.seat_order[holder] = self.next_seat_order
            self.next_seat_order += 1
        self.seats[holder] = seat
        self.seat_dirty.add(holder)
        lease = seat.held.lease
        moments = [seat.retry_at] if seat.retry_at is not None else []
        if lease is not None and lease.expiration is not None:
            moments.append(lease.expiration)
            if lease.checkout_type is CheckoutType.PROVISIONAL:
                moments.append(lease.expiration - EXTEND_WITHIN)
        for moment in moments:
            heapq.heappush(self.seat_times, (moment, holder))
        if len(self.seat_times) > 6 * len(self.seats) + 64:
            self.seat_times = [m for m in self.seat_times if self.seats.get(m[1]) is not None]
            heapq.heapify(self.seat_times)

    def drop_seat(self, holder: str) -> None:
        if self._journal is not None:
            self._journal.append(("seat", holder, self.seats[holder], self.seat_order[holder]))
        del self.seats[holder]
        del self.seat_order[holder]
        self.seat_dirty.add(holder)
        self.seat_next.discard(holder)

    def load_seats(self, seats: Iterable[tuple[str, Seat]]) -> None:
        if self._journal is not None:
            self._journal.append(("seats", "", dict(self.seats), dict(self.seat_order)))
        self._reset_seats()
        for holder, seat in seats:
            self.set_seat(holder, seat)

    def seat_candidates(self, now: datetime, basis: tuple[Any, ...]) -> list[str]:
        """The holders the review looks at now, in the seats' order: every one when what the
        review assumes of the product changed, else those changed since and those whose moment
        has come. Any other holder's answer is the same as at its last review: nothing to do."""
        last = self.seat_basis
        if (
            last is None
            or len(last) != len(basis)
            or any(a is not b for a, b in zip(basis, last, strict=True))
        ):
            self.seat_basis = basis
            self.seat_dirty = set()
            self.seat_times = [m for m in self.seat_times if m[0] > now]
            heapq.heapify(self.seat_times)
            return sorted(self.seats, key=self.seat_order.__getitem__)
        due = self.seat_dirty
        self.seat_dirty = set()
        times = self.seat_times
        while times and times[0][0] <= now:
            due.add(heapq.heappop(times)[1])
        order = self.seat_order
        return sorted((h for h in due if h in order), key=order.__getitem__)

    def next_seat_review(self) -> datetime | None:
        found: datetime | None = self.seat_next.min_other("")
        return found

    # --- one step: all or nothing -----------------------------------------------------------

    def begin(self) -> None:
        self._journal = []
        self._saved = (self.inflight, self.seat_basis)

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo every change since :meth:`begin` (a step raised): the pods, their order and the
        seats are as they were; the next seat review looks at every holder."""
        journal, self._journal = self._journal or [], None
        for kind, key, old, order in reversed(journal):
            if kind == "pod":
                if old is None:
                    self.remove(key)
                else:
                    self.put(old, order)
            elif kind == "pods":
                self._reset()
                for uid, record in old.items():
                    self.put(record, order[uid])
            elif kind == "seat":
                if old is None:
                    self.seats.pop(key, None)
                    self.seat_order.pop(key, None)
                    self.seat_next.discard(key)
                else:
                    self.set_seat(key, old)
                    self.seat_order[key] = order
            else:
                self._reset_seats()
                for holder, seat in old.items():
                    self.set_seat(holder, seat)
                self.seat_order = dict(order)
        self.inflight = self._saved[0]
        self.seat_basis = None
        self.next_seat_order = max(self.seat_order.values(), default=-1) + 1 if self.seat_order else 0
        # Pods may have been parked during the step: the dispatcher looks at every idle one again.
        for uid, record in self.pods.items():
            idle = record.busy is None and record.granted is None and record.denied is None
            if idle and record.retry_at is None:
                self.ready.set(uid, self.order[uid])

    # --- the dispatcher's queue -------------------------------------------------------------

    def promote_due(self, now: datetime) -> None:
        """Pods whose backoff has run out join the ready queue (in their order)."""
        retries = self.retries
        while retries and retries[0][0] <= now:
            at, order, uid = heapq.heappop(retries)
            record = self.pods.get(uid)
            if (
                record is not None
                and self.order[uid] == order
                and record.retry_at == at
                and record.busy is None
                and record.granted is None
                and record.denied is None
            ):
                self.ready.set(uid, order)
        if len(retries) > 2 * len(self.pods) + 64:
            self.retries = [
                (r.retry_at, self.order[u], u) for u, r in self.pods.items() if r.retry_at is not None
            ]
            heapq.heapify(self.retries)

    def park(self, uid: str) -> None:
        """The dispatcher looked at this ready pod and it stayed idle (see ``parked``)."""
        if self.ready.keys.pop(uid, None) is not None:
            self.parked[uid] = None

    def pop_ready(self) -> PodRecord | None:
        uid = self.ready.pop()
        return None if uid is None else self.pods[uid]

    def waiting(self) -> list[str]:
        """The ready queue, first first (a view for tests and debugging: O(n log n))."""
        return [uid for _, uid in sorted((k, u) for u, k in self.ready.keys.items())]

    # --- views ------------------------------------------------------------------------------

    def ahead(self, record: PodRecord) -> bool:
        """Whether another live pod goes before this one for a seat: one that waits for a seat and
        came first, or (for a gated pod) a running pod not answered yet."""
        mine = queue_key(record)
        first = self.seat_queue.min_other(record.uid)
        if first is not None and first < mine:
            return True
        if not mine[0]:
            return False
        first = self.running.min_other(record.uid)
        return first is not None and first < mine

    def tallied(self) -> Iterator[tuple[Tally, int]]:
        return ((t, n) for t, n in self.tally.items() if n)

    def live(self) -> Iterable[PodRecord]:
        tallies = self.tallies
        return (r for uid, r in self.pods.items() if tallies[uid].live)
