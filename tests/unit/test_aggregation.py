"""Hourly aggregation and rounding: hand-computed cases plus property tests of the bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering_operator.domain.aggregation import (
    AggregationError,
    HourAggregate,
    Quantity,
    QuantityOutOfRange,
    round_quantity,
)

H = datetime(2026, 11, 26, 10, tzinfo=UTC)


def at(minutes: float) -> datetime:
    return H + timedelta(minutes=minutes)


def scaled() -> HourAggregate:
    """3 replicas from :00, 5 from :20, 2 from :40."""
    return (
        HourAggregate.start(H)
        .observe(at(0), Decimal(3))
        .observe(at(20), Decimal(5))
        .observe(at(40), Decimal(2))
    )


def test_time_weighted_average_by_hand() -> None:
    # (3*20 + 5*20 + 2*20) / 60 = 10/3
    assert scaled().value("Average") == Fraction(10, 3)


def test_maximum_and_last() -> None:
    assert scaled().value("Maximum") == 5
    assert scaled().value("Last") == 2


def test_gap_counts_as_last_known_value() -> None:
    # one sample at :00 and nothing after: the value holds for the whole hour
    agg = HourAggregate.start(H).observe(at(0), Decimal(4))
    assert agg.value("Average") == 4
    # unevenly spaced samples weigh by time, not by count
    agg = HourAggregate.start(H).observe(at(0), Decimal(1)).observe(at(59), Decimal(61))
    assert agg.value("Average") == Fraction(1 * 59 + 61 * 1, 60)


def test_time_before_first_observation_counts_as_zero() -> None:
    agg = HourAggregate.start(H).observe(at(30), Decimal(4))
    assert agg.value("Average") == 2
    assert HourAggregate.start(H).value("Average") == 0
    assert HourAggregate.start(H).value("Maximum") == 0


def test_next_hour_carries_the_value_in_force() -> None:
    nxt = scaled().next_hour()
    assert nxt.hour == H + timedelta(hours=1)
    assert nxt.value("Average") == 2
    # a change at :30 of the next hour: 2 for 30 min, 6 for 30 min
    assert nxt.observe(nxt.hour + timedelta(minutes=30), Decimal(6)).value("Average") == 4
    assert nxt.observe(nxt.hour + timedelta(minutes=30), Decimal(6)).value("Maximum") == 6


def test_sub_second_exactness() -> None:
    # 0.5 cores for 1 microsecond, then 0: exact, no float error
    agg = (
        HourAggregate.start(H)
        .observe(at(0), Decimal("0.5"))
        .observe(H + timedelta(microseconds=1), Decimal(0))
    )
    assert agg.value("Average") == Fraction(1, 2) * Fraction(1, 10**6) / 3600


def test_parts_weights_follow_usage() -> None:
    agg = (
        HourAggregate.start(H)
        .observe(at(0), Decimal(3), {"a": Decimal(2), "b": Decimal(1)})
        .observe(at(30), Decimal(1), {"b": Decimal(1)})
    )
    w = agg.part_weights("Average")
    assert w == {"a": Fraction(2 * 1800), "b": Fraction(3600)}
    assert agg.part_weights("Last") == {"a": 0, "b": 1}


@pytest.mark.parametrize(
    ("value", "rounding", "expected", "decimal"),
    [
        (Fraction(10, 3), "Up", "4", False),
        (Fraction(10, 3), "Down", "3", False),
        (Fraction(10, 3), "Nearest", "3", False),
        (Fraction(10, 3), "Decimal", "3.333333", True),
        (Fraction(20, 3), "Decimal", "6.666667", True),
        (Fraction(5, 2), "Nearest", "3", False),
        (Fraction(3), "Up", "3", False),
        (Fraction(1, 2_000_000), "Decimal", "0.000001", True),
        (Fraction(1, 2_000_001), "Decimal", "0", True),
        (Fraction(17), "Decimal", "17", True),
    ],
)
def test_rounding(value: Fraction, rounding: str, expected: str, decimal: bool) -> None:
    q = round_quantity(value, rounding)
    assert str(q) == expected
    assert q.decimal is decimal


def test_quantity_text_and_limits() -> None:
    assert str(Quantity(Decimal("2.500000"), True)) == "2.5"
    assert str(Quantity(Decimal(10), True)) == "10"
    with pytest.raises(QuantityOutOfRange, match="exceeds"):
        Quantity(Decimal(2**31), False)
    with pytest.raises(QuantityOutOfRange, match="6 decimal places"):
        Quantity(Decimal("0.0000001"), True)
    with pytest.raises(QuantityOutOfRange, match="not a whole number"):
        Quantity(Decimal("1.5"), False)
    with pytest.raises(QuantityOutOfRange, match="negative"):
        round_quantity(Fraction(-1), "Up")
    with pytest.raises(ValueError, match="Rounding"):
        round_quantity(Fraction(1), "Sideways")


def test_bad_samples_are_refused() -> None:
    agg = HourAggregate.start(H).observe(at(10), Decimal(1))
    with pytest.raises(AggregationError, match="older than"):
        agg.observe(at(5), Decimal(1))
    with pytest.raises(AggregationError, match="outside the hour"):
        agg.observe(H + timedelta(hours=1), Decimal(1))
    with pytest.raises(AggregationError, match=">= 0"):
        agg.observe(at(20), Decimal(-1))
    with pytest.raises(ValueError, match="naive"):
        agg.observe(datetime(2026, 11, 26, 10, 30), Decimal(1))
    with pytest.raises(AggregationError, match="start of a UTC hour"):
        HourAggregate.start(at(1))


values = st.decimals(min_value=0, max_value=10_000, places=3, allow_nan=False, allow_infinity=False)


@given(
    carried=values,
    steps=st.lists(st.tuples(st.integers(min_value=0, max_value=3_599_999_999), values), max_size=30),
)
def test_average_lies_between_min_and_max_in_force(
    carried: Decimal, steps: list[tuple[int, Decimal]]
) -> None:
    agg = HourAggregate.start(H, carried)
    seen = [carried]
    for micros, value in sorted(steps, key=lambda s: s[0]):
        agg = agg.observe(H + timedelta(microseconds=micros), value)
        seen.append(value)
    avg = agg.value("Average")
    assert Fraction(min(seen)) <= avg <= Fraction(max(seen))
    assert agg.value("Maximum") == Fraction(max(seen))
    assert agg.value("Last") == Fraction(seen[-1])
    up, down, nearest = (round_quantity(avg, r).value for r in ("Up", "Down", "Nearest"))
    assert down <= avg <= up
    assert up - down <= 1
    assert abs(Fraction(nearest) - avg) <= Fraction(1, 2)
    dec = round_quantity(avg, "Decimal").value
    assert abs(Fraction(dec) - avg) <= Fraction(1, 2 * 10**6)
