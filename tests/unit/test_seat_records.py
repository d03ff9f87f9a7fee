"""The operator's seat record entries: written and read back exactly; unreadable ones forgotten."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from metering_operator.domain.license_seats import HeldSeat, SeatLease
from metering_operator.domain.product import CheckoutType
from metering_operator.kube.records import record_name
from metering_operator.kube.seat_records import decode, encode

T0 = datetime(2031, 7, 9, 10, 0, tzinfo=UTC)


def test_a_lease_round_trips() -> None:
    seat = HeldSeat(
        "uid-1",
        3,
        SeatLease("uid-1", "0" * 32, CheckoutType.PROVISIONAL, T0),
        signed="a.b.c",
        issued_at=T0,
        license_arn="arn:aws:license-manager::111122223333:license:l-1",
        pod="pod-1",
        service_account="buyer",
    )
    assert decode("uid-1", encode(seat)) == seat


def test_a_holder_without_a_lease_keeps_its_checkout_count() -> None:
    seat = HeldSeat("uid-1", 2, None, pod="pod-1")
    assert decode("uid-1", encode(seat)) == seat


def test_garbage_is_not_a_lease() -> None:
    assert decode("uid-1", "not json") is None
    assert decode("uid-1", '{"n": "many"}') is None


def test_seat_and_denial_records_are_different_objects() -> None:
    assert record_name("ns", "p") != record_name("ns", "p", "mmo-seats")


def test_a_record_is_dead_once_every_lease_expired() -> None:
    from metering_operator.kube.seat_records import any_lease_live

    live = HeldSeat("a", 1, SeatLease("a", "t", CheckoutType.PROVISIONAL, T0))
    counted = HeldSeat("b", 2, None)
    data = {"a": encode(live), "b": encode(counted)}
    assert any_lease_live(data, T0 - timedelta(seconds=1))
    assert not any_lease_live(data, T0)
    assert any_lease_live({"c": "garbage"}, T0)  # unreadable: kept
