"""When to check License Manager seats out, extend them and check them in: pure decisions.

A contract product holds seats with CheckoutLicense. A PROVISIONAL checkout holds its seats for
the license's time to live (AWS: 60 minutes) unless extended (ExtendLicenseConsumption) or returned
(CheckInLicense); a PERPETUAL checkout draws them down for good. Given who needs a seat now (the
selected pods by uid, or :data:`CLUSTER_HOLDER` for per-cluster entitlements), the leases on record
and the time, :func:`plan_seats` says what to do, so that:

* every holder that needs a seat gets one (``Checkout``), and keeps it while it lives (``Extend``
  once the lease is within ``extend_within`` of expiring: early enough to retry a throttled call);
* a seat is returned as soon as its holder is gone (``CheckIn``), before new checkouts are asked
  for, so a scale-down frees seats for the pods that wait;
* a lease past its expiration is dropped (``Forget``): AWS has already returned the seat, and a
  check-in would only answer ResourceNotFound. This is also what bounds a crash: an operator that
  dies holds no seat longer than the time to live, and on restart it forgets and re-checks out;
* two live leases for one holder (a crash between a checkout and writing it down) keep the one
  that lasts longest and check the other in, so no seat is held twice.

No I/O and no clock of its own: ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from metering_operator.domain.clock import ensure_utc
from metering_operator.domain.product import CheckoutType

#: The holder of per-cluster entitlements (checked out once for the product, as the operator).
CLUSTER_HOLDER = "cluster"
#: Extend a PROVISIONAL lease once it has this little left: a third of AWS's 60 minutes, room for
#: several backed-off retries of a throttled ExtendLicenseConsumption before the seat would lapse.
EXTEND_WITHIN = timedelta(minutes=20)


class SeatAction(StrEnum):
    CHECK_IN = "CheckIn"
    EXTEND = "Extend"
    CHECKOUT = "Checkout"
    FORGET = "Forget"


@dataclass(frozen=True)
class SeatLease:
    """One checkout on record: who holds it, its LicenseConsumptionToken and when it lapses."""

    holder: str
    token: str
    checkout_type: CheckoutType
    #: None for a PERPETUAL checkout of a license without an end.
    expiration: datetime | None

    def lapsed(self, now: datetime) -> bool:
        return self.expiration is not None and ensure_utc(now) >= ensure_utc(self.expiration)


@dataclass(frozen=True)
class HeldSeat:
    """The operator's record of one holder's checkouts (a pod uid or :data:`CLUSTER_HOLDER`).

    ``count`` is how many checkouts were made for the holder: the next one's ClientToken is
    derived from the holder and ``count + 1``, so a checkout retried after a lost answer (or an
    operator crash before this record was written) repeats the same ClientToken and License
    Manager answers it with the same checkout instead of holding a second seat."""

    holder: str
    count: int = 0
    lease: SeatLease | None = None
    #: The SignedToken of the lease's checkout (what the pod's ``signature`` annotation shows).
    signed: str = ""
    issued_at: datetime | None = None
    license_arn: str = ""
    #: The pod's name and service account (scope Pod: whose identity extends and checks in).
    pod: str = ""
    service_account: str | None = None


def client_token(holder: str, count: int) -> str:
    """CheckoutLicense's ClientToken for checkout number ``count`` of ``holder`` (stable: see HeldSeat)."""
    return f"mmo-{holder}-{count}"


@dataclass(frozen=True)
class SeatStep:
    action: SeatAction
    holder: str
    #: The lease acted on (None for a Checkout).
    lease: SeatLease | None = None


_ORDER = {SeatAction.FORGET: 0, SeatAction.CHECK_IN: 1, SeatAction.EXTEND: 2, SeatAction.CHECKOUT: 3}


def plan_seats(
    needed: Iterable[str],
    leases: Iterable[SeatLease],
    now: datetime,
    *,
    extend_within: timedelta = EXTEND_WITHIN,
) -> list[SeatStep]:
    """The steps that bring the leases in line with ``needed`` at ``now``, check-ins first."""
    now = ensure_utc(now)
    wanted = set(needed)
    steps: list[SeatStep] = []
    live: dict[str, list[SeatLease]] = {}
    for lease in leases:
        if lease.lapsed(now):
            steps.append(SeatStep(SeatAction.FORGET, lease.holder, lease))
        else:
            live.setdefault(lease.holder, []).append(lease)
    for holder, held in live.items():
        # Longest-lasting first; a perpetual lease (no expiration) lasts longest of all.
        held.sort(key=lambda lease: (lease.expiration is None, lease.expiration or now), reverse=True)
        keep, extra = (held[0], held[1:]) if holder in wanted else (None, held)
        for lease in extra:
            # A perpetual checkout cannot be returned (AWS answers ConflictException): only forgotten.
            action = (
                SeatAction.FORGET if lease.checkout_type is CheckoutType.PERPETUAL else SeatAction.CHECK_IN
            )
            steps.append(SeatStep(action, holder, lease))
        if (
            keep is not None
            and keep.checkout_type is CheckoutType.PROVISIONAL
            and keep.expiration is not None
            and ensure_utc(keep.expiration) - now <= extend_within
        ):
            steps.append(SeatStep(SeatAction.EXTEND, holder, keep))
    steps.extend(SeatStep(SeatAction.CHECKOUT, holder) for holder in wanted if holder not in live)
    steps.sort(key=lambda step: (_ORDER[step.action], step.holder))
    return steps


def next_review(
    leases: Iterable[SeatLease], now: datetime, *, extend_within: timedelta = EXTEND_WITHIN
) -> datetime | None:
    """When :func:`plan_seats` will next have something to do without any change of pods:
    the earliest moment a PROVISIONAL lease is due for extension (``now`` if one already is)."""
    now = ensure_utc(now)
    due = [
        max(now, ensure_utc(lease.expiration) - extend_within)
        for lease in leases
        if lease.checkout_type is CheckoutType.PROVISIONAL and lease.expiration is not None
    ]
    return min(due) if due else None


# --- NoEntitlementsAllowed: no seat free now, or not entitled at all? ----------------------------
#
# CheckoutLicense answers NoEntitlementsAllowedException both when the buyer's license lacks what
# was asked for (no license for the SKU, an entitlement it does not have, expired) and when every
# floating seat is held right now; AWS documents no field that tells the two apart. The license
# itself does: ListReceivedLicenses (an action AWS's seller guide already grants container
# contracts) returns each received license with its status, validity and every entitlement's unit,
# MaxCount and Overage. :func:`judge_refusal` reads that answer: if a usable license has every
# entitlement asked for, in that unit, with a MaxCount that could hold the request, the refusal
# can only be "no seat free now" (retry later); otherwise it is final.


@dataclass(frozen=True)
class OfferedEntitlement:
    """One entitlement of a received license, as ListReceivedLicenses describes it."""

    name: str
    unit: str
    max_count: int | None = None
    overage: bool = False


@dataclass(frozen=True)
class OfferedLicense:
    license_arn: str
    status: str
    entitlements: tuple[OfferedEntitlement, ...]
    begin: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class NeededEntitlement:
    name: str
    unit: str
    quantity: int


@dataclass(frozen=True)
class Refusal:
    """Why CheckoutLicense refused: ``exhausted`` (wait for a seat) or final, with the reason."""

    exhausted: bool
    reason: str


def _license_refuses(lic: OfferedLicense, wanted: Iterable[NeededEntitlement], now: datetime) -> str | None:
    """Why ``lic`` can never satisfy ``wanted`` (None: it could, were seats free)."""
    if lic.status != "AVAILABLE":
        return f"license {lic.license_arn} is {lic.status}"
    if lic.begin is not None and now < ensure_utc(lic.begin):
        return f"license {lic.license_arn} is not valid before {ensure_utc(lic.begin).isoformat()}"
    if lic.end is not None and now >= ensure_utc(lic.end):
        return f"license {lic.license_arn} ended at {ensure_utc(lic.end).isoformat()}"
    for need in wanted:
        offered = next((e for e in lic.entitlements if e.name == need.name), None)
        if offered is None:
            return f"license {lic.license_arn} has no entitlement {need.name}"
        if offered.unit != need.unit:
            return f"entitlement {need.name} of {lic.license_arn} is in {offered.unit}, not {need.unit}"
        if (
            need.unit != "None"
            and offered.max_count is not None
            and not offered.overage
            and offered.max_count < need.quantity
        ):
            return (
                f"entitlement {need.name} of {lic.license_arn} has {offered.max_count} {need.unit} in all, "
                f"{need.quantity} are asked for at once"
            )
    return None


def judge_refusal(
    licenses: Iterable[OfferedLicense], wanted: Iterable[NeededEntitlement], now: datetime
) -> Refusal:
    """Classify a NoEntitlementsAllowed answer by the buyer's received licenses (see above)."""
    now = ensure_utc(now)
    needs = list(wanted)
    reasons: list[str] = []
    for lic in licenses:
        why = _license_refuses(lic, needs, now)
        if why is None:
            names = ", ".join(n.name for n in needs)
            return Refusal(
                True,
                f"SeatsExhausted: license {lic.license_arn} has {names}, but no seat is free now; "
                "waiting for one to be checked in or to expire",
            )
        reasons.append(why)
    if not reasons:
        return Refusal(False, "NoEntitlementsAllowed: the buyer has received no license for this product")
    return Refusal(False, "NoEntitlementsAllowed: " + "; ".join(reasons))
