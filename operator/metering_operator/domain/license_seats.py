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
