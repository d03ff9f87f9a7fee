"""The operator's record of License Manager checkouts: a ConfigMap per product in its namespace.

What proves a contract pod's grant. A RegisterUsage grant carries its own proof (a signature for
the pod's uid); a License Manager checkout does not: its SignedToken names a consumption token
and a node id, and a buyer who can edit pods could copy one onto another pod. So the proof is the
operator's own record, kept where buyers cannot write -- the operator's namespace, like the denial
record (:mod:`metering_operator.kube.records`) -- keyed by pod uid (or ``cluster``), holding the
consumption token, its expiration, the SignedToken and how many checkouts were made for the
holder (for the idempotent ClientToken). The entry is written *after* the SignedToken verified
and *before* the pod is released; a pod is granted on a live lease in this record only, never on
its annotations. After a restart the record is what lets the operator extend the leases of live
pods and check in those of pods that went away; a lease past its expiration is forgotten (AWS has
returned the seat).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from metering_operator.domain.conditions import format_time, parse_time
from metering_operator.domain.license_seats import HeldSeat, SeatLease
from metering_operator.domain.product import CheckoutType
from metering_operator.kube.records import OperatorRecords

SEATS_COMPONENT_NAME = "license-seats"
SEATS_COMPONENT = {"app.kubernetes.io/component": SEATS_COMPONENT_NAME}


def _time(value: Any) -> datetime | None:
    return parse_time(value) if isinstance(value, str) and value else None


def encode(seat: HeldSeat) -> str:
    entry: dict[str, Any] = {"pod": seat.pod, "n": seat.count}
    if seat.service_account:
        entry["sa"] = seat.service_account
    lease = seat.lease
    if lease is not None:
        entry.update(
            {
                "token": lease.token,
                "type": lease.checkout_type.value,
                "exp": format_time(lease.expiration) if lease.expiration else None,
                "iat": format_time(seat.issued_at) if seat.issued_at else None,
                "arn": seat.license_arn,
                "signed": seat.signed,
            }
        )
    return json.dumps(entry, separators=(",", ":"))


def decode(holder: str, raw: str) -> HeldSeat | None:
    """An entry as written by :func:`encode`; None when it cannot be read (then it is forgotten)."""
    try:
        entry = json.loads(raw)
        count = int(entry.get("n") or 0)
        lease = None
        if entry.get("token"):
            lease = SeatLease(
                holder,
                str(entry["token"]),
                CheckoutType(entry.get("type") or CheckoutType.PROVISIONAL.value),
                _time(entry.get("exp")),
            )
        return HeldSeat(
            holder=holder,
            count=count,
            lease=lease,
            signed=str(entry.get("signed") or ""),
            issued_at=_time(entry.get("iat")),
            license_arn=str(entry.get("arn") or ""),
            pod=str(entry.get("pod") or ""),
            service_account=entry.get("sa") or None,
        )
    except (ValueError, TypeError, AttributeError):
        return None


class SeatRecords(OperatorRecords):
    """Read and write one product's seat record (blocking: worker threads only)."""

    prefix = "mmo-seats"
    component = SEATS_COMPONENT

    def load(self, product_namespace: str, product_name: str) -> dict[str, HeldSeat]:
        seats: dict[str, HeldSeat] = {}
        for holder, raw in self.read(product_namespace, product_name).items():
            seat = decode(holder, raw)
            if seat is not None:
                seats[holder] = seat
        return seats

    def put(self, product_namespace: str, product_name: str, seat: HeldSeat) -> None:
        self._merge(product_namespace, product_name, {seat.holder: encode(seat)})

    def drop(self, product_namespace: str, product_name: str, holder: str) -> None:
        self._merge(product_namespace, product_name, {holder: None}, create=False)


def any_lease_live(data: dict[str, str], now: datetime) -> bool:
    """Whether a seat record still holds a lease AWS has not returned (or one it cannot read)."""
    for holder, raw in data.items():
        seat = decode(holder, raw)
        if seat is None:
            return True
        if seat.lease is not None and not seat.lease.lapsed(now):
            return True
    return False
