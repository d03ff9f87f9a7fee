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
* a tally of the pods by what the status and the gauges count, so a status flush reads counters.

**Ownership.** The book is mutable and owned by the one chain of states its controller steps: a
step updates it in place and returns a state that shares it. A state that has been stepped is
spent: :func:`~metering_operator.gate.machine.step` refuses it (:class:`StaleState`), so nothing can
go on from an old state and silently share the new one's pods. Heaps use lazy deletion: an entry
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
from metering_operator.domain.product import EntitlementState

if TYPE_CHECKING:
    from metering_operator.gate.model import PodRecord

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
        self.next_order = 0
        self._reset()

    def _reset(self) -> None:
        #: uid -> record, in the pods' order (first seen, or the last list's).
        self.pods: dict[str, PodRecord] = {}
        self.order: dict[str, int] = {}
        #: RegisterUsage / CheckoutLicense calls in flight for the product.
        self.inflight = 0
        self.ready = _KeyHeap()
        self.retries: list[tuple[datetime, int, str]] = []
        #: Pods waiting for a License Manager seat (uid -> None, in the order they began to wait).
        self.seat_waiters: dict[str, None] = {}
        self.seat_queue = _KeyHeap()
        self.running = _KeyHeap()
        #: Live, not denied pods: the holders a contract product needs a seat for.
        self.needed: dict[str, None] = {}
        self.tallies: dict[str, Tally] = {}
        self.tally: Counter[Tally] = Counter()

    # --- the one way a record changes -------------------------------------------------------

    def put(self, record: PodRecord) -> None:
        uid = record.uid
        if uid not in self.pods:
            self.order[uid] = self.next_order
            self.next_order += 1
        self.pods[uid] = record
        order = self.order[uid]
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
        if live and record.denied is None:
            self.needed[uid] = None
        else:
            self.needed.pop(uid, None)
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
        del self.order[uid]
        self.ready.discard(uid)
        self.seat_waiters.pop(uid, None)
        self.seat_queue.discard(uid)
        self.running.discard(uid)
        self.needed.pop(uid, None)
        tally = self.tallies.pop(uid)
        self.tally[tally] -= 1
        return record

    def clear(self) -> None:
        """Forget every pod (a new list follows); the version and the order counter go on."""
        self._reset()

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
