"""The gate's state machine's vocabulary: the state, one record per pod, messages and effects.

Plain frozen data, no behaviour beyond small views; the transitions are
:func:`metering_operator.gate.machine.step`. Messages are what the controller feeds in (pod events,
workers' results, timers, product changes); effects are what the step asks the controller to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal, TypeVar

from metering_operator.aws.backoff import Backoff
from metering_operator.domain import entitlement as ent
from metering_operator.domain.license_seats import HeldSeat, SeatAction
from metering_operator.domain.onfailure import Hold
from metering_operator.domain.product import EntitlementState, PodCounts
from metering_operator.gate.book import Book
from metering_operator.gate.cluster import ClusterRegistration
from metering_operator.gate.product import ProductInfo
from metering_operator.kube.pods import WorkloadRef

Pod = Mapping[str, Any]
EventType = Literal["Normal", "Warning"]
#: The timer key of scope Cluster's registration (pod timers are keyed by uid).
CLUSTER = "<cluster>"
#: The timer key of License Manager seat reviews (extensions, check-ins, retries).
SEATS = "<seats>"
#: How a pod waiting for a License Manager seat is marked (its reason's code).
SEATS_EXHAUSTED = "SeatsExhausted"

#: The gate's one backoff: 0.5 s, doubling, capped at a minute, full jitter.
BACKOFF = Backoff(base=0.5, cap=60.0)


@dataclass(frozen=True)
class GatePolicy:
    ungated_action: ent.UngatedPodAction = ent.UngatedPodAction.EVICT
    max_inflight: int = 16
    backoff: Backoff = BACKOFF


class Busy(StrEnum):
    REGISTER = "register"  # one RegisterUsage attempt in flight
    WRITE = "write"  # one pod write (grant, state, denial) in flight
    EVICT = "evict"  # one eviction in flight


@dataclass(frozen=True)
class Proof:
    """A verified RegisterUsage signature for this pod (Pod scope: nonce = its uid)."""

    token: str
    issued_at: datetime | None


@dataclass(frozen=True)
class PodRecord:
    uid: str
    pod: Pod
    granted: Proof | None = None
    #: The operator's own denial (reason); survives restarts through the denial record.
    denied: str | None = None
    #: Whether ``denied`` is in the operator's denial record yet (written before the pod's annotation).
    recorded: bool = True
    busy: Busy | None = None
    #: Failed attempts since the last success (registration, write or eviction): the backoff's input.
    attempts: int = 0
    retry_at: datetime | None = None
    #: Pending (transient failure) or Error, while neither granted nor denied.
    waiting: EntitlementState | None = None
    reason: str = ""
    #: Seen in Enforce running without the gate and without a grant.
    ungated: bool = False
    #: Evicted or reported already (once per pod).
    acted: bool = False
    #: The annotation signature last judged, so an unchanged one is not verified again.
    judged_token: str | None = None
    workload: WorkloadRef | None = None
    #: Whether the owning workload has been looked up (once per pod: ownership never changes).
    owner_looked_up: bool = False
    #: The onFailure hold reason written on this gated pod (once per hold, not every hour).
    held: str | None = None

    @property
    def name(self) -> str:
        return str(self.pod.get("metadata", {}).get("name", ""))

    @property
    def state(self) -> EntitlementState | None:
        if self.granted is not None:
            return EntitlementState.GRANTED
        if self.denied is not None:
            return EntitlementState.DENIED
        return self.waiting

    @property
    def waits_for_seat(self) -> bool:
        """Waiting for a License Manager seat to free up (contract products)."""
        return self.granted is None and self.denied is None and self.reason.startswith(SEATS_EXHAUSTED)


@dataclass(frozen=True)
class Seat:
    """A License Manager holder's seat as the machine tracks it (contract products only)."""

    held: HeldSeat
    #: An ExtendLicenseConsumption or CheckInLicense in flight.
    busy: bool = False
    attempts: int = 0
    retry_at: datetime | None = None


@dataclass(frozen=True)
class GateState:
    """One product's gate. The pods live in ``book`` (:mod:`metering_operator.gate.book`), which a
    step updates in place: a state is spent once stepped, and only the state a step returns goes on."""

    policy: GatePolicy = field(default_factory=GatePolicy)
    info: ProductInfo | None = None
    book: Book = field(default_factory=Book, repr=False, compare=False)
    #: The book's version this state was returned at (a spent state's is behind).
    version: int = 0
    listed: bool = False
    cluster: ClusterRegistration | None = None
    cluster_busy: bool = False
    cluster_attempts: int = 0
    last_denial: str | None = None
    last_error: str | None = None
    seats_loaded: bool = False
    seats_loading: bool = False
    #: When the next seat review is scheduled (None: none pending).
    seats_review_at: datetime | None = None
    #: The product's per-cluster checkout (holder ``cluster``, as the operator): in flight, failed
    #: attempts, when to retry, and a final refusal (then every pod is denied).
    seats_cluster_busy: bool = False
    seats_cluster_attempts: int = 0
    seats_cluster_retry: datetime | None = None
    seats_cluster_denied: str | None = None
    #: ``spec.metering.onFailure`` in force: new pods stay gated (and with ``evict``, running
    #: ones are evicted) until an hour is reported again.
    hold: Hold | None = None

    @property
    def pods(self) -> Mapping[str, PodRecord]:
        """Every pod of the product by uid (read only: the machine changes it through the book)."""
        return self.book.pods

    @property
    def seats(self) -> Mapping[str, Seat]:
        """Contract products: each holder's seat (pod uid -> Seat), loaded from the operator's
        record (read only: the machine changes it through the book)."""
        return self.book.seats

    @property
    def inflight(self) -> int:
        """RegisterUsage / CheckoutLicense calls in flight for the product."""
        return self.book.inflight

    # The views below read the book's tally (kept by every change of a record): a status flush
    # costs O(1), not a walk over every pod.

    def counts(self) -> PodCounts:
        registered = pending = denied = 0
        for tally, n in self.book.tallied():
            if not tally.live:
                continue
            if tally.state is EntitlementState.GRANTED:
                registered += n
            elif tally.state is EntitlementState.DENIED:
                denied += n
            else:
                pending += n
        return PodCounts(registered=registered, pending=pending, denied=denied)

    def live(self) -> list[PodRecord]:
        return list(self.book.live())

    def ungated(self) -> int:
        return sum(n for tally, n in self.book.tallied() if tally.ungated)

    def exhausted(self) -> int:
        """Pods waiting for a License Manager seat to free up."""
        return sum(n for tally, n in self.book.tallied() if tally.exhausted)

    def seats_held(self) -> int:
        return sum(1 for s in self.seats.values() if s.held.lease is not None)

    def held(self) -> dict[str, int]:
        """Pods behind the gate now, by state (``waiting``: not registered yet)."""
        held = {"waiting": 0, "Pending": 0, "Denied": 0, "Error": 0}
        for tally, n in self.book.tallied():
            if tally.held:
                key = tally.state.value if tally.state is not None else "waiting"
                held[key] = held.get(key, 0) + n
        return held


# --- messages ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProductChanged:
    info: ProductInfo | None


@dataclass(frozen=True)
class Listed:
    """A full list of the product's pods, and the operator's denial record at that time."""

    pods: tuple[Pod, ...]
    denials: Mapping[str, str]


@dataclass(frozen=True)
class PodUpdated:
    pod: Pod


@dataclass(frozen=True)
class PodDeleted:
    uid: str


@dataclass(frozen=True)
class Due:
    """A timer fired (a pod's uid, or :data:`CLUSTER`)."""

    key: str


@dataclass(frozen=True)
class Granted:
    token: str
    issued_at: datetime | None
    #: Contract products: the checkout as recorded (the grant's proof).
    seat: HeldSeat | None = None


@dataclass(frozen=True)
class Exhausted:
    """CheckoutLicense: the license has the entitlement, but no seat is free now."""

    reason: str
    #: The checkout number that was refused: the next attempt uses a new ClientToken (an answered
    #: request's token is never reused, in case AWS remembers its answer).
    count: int = 0


@dataclass(frozen=True)
class Denied:
    reason: str


@dataclass(frozen=True)
class Failed:
    reason: str
    transient: bool


@dataclass(frozen=True)
class Vanished:
    """The pod went away (or changed uid) while it was worked on."""


RegisterResult = Granted | Denied | Failed | Vanished | Exhausted


@dataclass(frozen=True)
class Registered:
    uid: str
    result: RegisterResult


@dataclass(frozen=True)
class Written:
    """A pod write finished: the pod as written (None: nothing written), or why it failed."""

    uid: str
    pod: Pod | None = None
    error: str | None = None
    workload: WorkloadRef | None = None


@dataclass(frozen=True)
class Evicted:
    """An eviction's answer. It carries the pod and the reason itself: the pod's deletion can reach
    the machine before this answer does, and the Events must not depend on that race."""

    uid: str
    pod: Pod
    reason: str
    error: str | None = None
    transient: bool = False
    #: The pod was gone already (or replaced under its name): nothing was evicted.
    gone: bool = False
    cause: Literal["ungated", "metering"] = "ungated"


@dataclass(frozen=True)
class WorkloadFound:
    uid: str
    workload: WorkloadRef | None


@dataclass(frozen=True)
class MeteringHold:
    """The product's usage could not be reported for ``onFailure.afterHours`` hours (a
    :class:`~metering_operator.domain.onfailure.Hold`), or can be again (None)."""

    hold: Hold | None


@dataclass(frozen=True)
class ClusterDone:
    registration: ClusterRegistration
    transient: bool = False


@dataclass(frozen=True)
class SeatsLoaded:
    """The operator's seat record of a contract product (None: it could not be read)."""

    seats: Mapping[str, HeldSeat] | None
    error: str | None = None


@dataclass(frozen=True)
class SeatDone:
    """An ExtendLicenseConsumption / CheckInLicense answered."""

    holder: str
    action: SeatAction
    #: Extend: the seat with its new expiration.
    seat: HeldSeat | None = None
    error: str | None = None
    #: The lease was gone already (expired or checked in): AWS holds no seat for it.
    gone: bool = False


Message = (
    ProductChanged
    | Listed
    | PodUpdated
    | PodDeleted
    | Due
    | Registered
    | Written
    | Evicted
    | WorkloadFound
    | ClusterDone
    | SeatsLoaded
    | SeatDone
    | MeteringHold
)

# --- effects -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    """One RegisterUsage attempt for the pod (its own IRSA identity, nonce = its uid)."""

    pod: Pod
    info: ProductInfo


@dataclass(frozen=True)
class WriteGrant:
    """One guarded patch: remove the gate, record the verified signature."""

    pod: Pod
    info: ProductInfo
    proof: Proof
    at: datetime


@dataclass(frozen=True)
class WriteState:
    """Record Pending / Error (and, with ``release``, Audit's gate removal) on the pod."""

    pod: Pod
    info: ProductInfo
    state: EntitlementState
    reason: str
    release: bool = False


@dataclass(frozen=True)
class Deny:
    """Record the denial in the operator's own record first (if ``durable``), then on the pod."""

    pod: Pod
    info: ProductInfo
    reason: str
    release: bool
    durable: bool
    at: datetime


@dataclass(frozen=True)
class Evict:
    pod: Pod
    info: ProductInfo
    reason: str
    #: Why: a pod running without a grant (``ungated``), or ``onFailure: Evict`` (``metering``).
    cause: Literal["ungated", "metering"] = "ungated"


@dataclass(frozen=True)
class PostEvent:
    ref: Mapping[str, str]
    type: EventType
    reason: str
    message: str


@dataclass(frozen=True)
class Schedule:
    at: datetime
    key: str


@dataclass(frozen=True)
class RegisterCluster:
    info: ProductInfo
    previous: ClusterRegistration | None
    attempts: int


@dataclass(frozen=True)
class FindWorkload:
    """Look up the Deployment / StatefulSet / DaemonSet owning the pod (for its summary)."""

    pod: Pod


@dataclass(frozen=True)
class PruneDenials:
    info: ProductInfo
    uids: frozenset[str]


@dataclass(frozen=True)
class Checkout:
    """One CheckoutLicense for the pod (checkout number ``count`` of it: the ClientToken)."""

    pod: Pod
    info: ProductInfo
    count: int


@dataclass(frozen=True)
class CheckoutCluster:
    """One CheckoutLicense of the product's per-cluster entitlements, as the operator."""

    info: ProductInfo
    count: int


@dataclass(frozen=True)
class SeatOp:
    """Extend or check in one holder's lease."""

    info: ProductInfo
    action: SeatAction
    seat: HeldSeat


@dataclass(frozen=True)
class LoadSeats:
    info: ProductInfo


@dataclass(frozen=True)
class ForgetSeat:
    """Drop a holder from the seat record (its lease lapsed: AWS returned the seat)."""

    info: ProductInfo
    holder: str


Effect = (
    Register
    | WriteGrant
    | WriteState
    | Deny
    | Evict
    | PostEvent
    | Schedule
    | RegisterCluster
    | FindWorkload
    | PruneDenials
    | Checkout
    | CheckoutCluster
    | SeatOp
    | LoadSeats
    | ForgetSeat
)
Step = tuple[GateState, list[Effect]]


_T = TypeVar("_T")
_FIELDS: dict[type, frozenset[str]] = {}


def evolve(obj: _T, **changes: Any) -> _T:
    """``dataclasses.replace`` for the machine's plain frozen records, without running ``__init__``
    again (replace was 1.5 % of the operator's own CPU in a burst). Only for dataclasses without
    ``__post_init__`` or slots; a name that is not a field is refused as replace would."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    if not changes.keys() <= names:
        raise TypeError(f"{cls.__name__} has no field {sorted(changes.keys() - names)}")
    new = object.__new__(cls)
    new.__dict__.update(obj.__dict__)
    new.__dict__.update(changes)
    return new
