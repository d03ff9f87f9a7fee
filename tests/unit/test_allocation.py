"""Largest-remainder allocation: exact sums, determinism and AWS limits."""

from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from metering_operator.domain.aggregation import Quantity
from metering_operator.domain.allocation import (
    MAX_ALLOCATIONS,
    Allocation,
    AllocationError,
    allocate,
    check_allocations,
    complete,
    merge,
    normalise_tags,
    parse_tag_key,
    tag_key,
    tag_value,
)


def key(**tags: str) -> str:
    return tag_key(normalise_tags(tags))


def by_tags(allocations: list[Allocation]) -> dict[str, str]:
    return {",".join(f"{k}={v}" for k, v in a.tags): str(a.quantity) for a in allocations}


def test_integer_split_uses_largest_remainder_with_deterministic_ties() -> None:
    weights = {key(team="a"): Fraction(1), key(team="b"): Fraction(1), key(team="c"): Fraction(1)}
    result = allocate(Quantity(Decimal(10), False), weights)
    assert by_tags(result) == {"team=a": "4", "team=b": "3", "team=c": "3"}
    # same input in another order: same output
    assert allocate(Quantity(Decimal(10), False), dict(reversed(weights.items()))) == result


def test_largest_remainder_not_largest_weight() -> None:
    # shares of 7 by 45:30:25 -> 3.15, 2.1, 1.75 -> floors 3,2,1 and the one left goes to .75
    weights = {key(team="a"): Fraction(45), key(team="b"): Fraction(30), key(team="c"): Fraction(25)}
    assert by_tags(allocate(Quantity(Decimal(7), False), weights)) == {
        "team=a": "3",
        "team=b": "2",
        "team=c": "2",
    }


def test_decimal_split_in_millionths() -> None:
    weights = {key(ns="x"): Fraction(1), key(ns="y"): Fraction(1), key(ns="z"): Fraction(1)}
    result = allocate(Quantity(Decimal(1), True), weights)
    assert by_tags(result) == {"ns=x": "0.333334", "ns=y": "0.333333", "ns=z": "0.333333"}
    assert (result[0].tags, str(result[0].quantity), result[0].quantity.decimal) == (
        (("ns", "x"),),
        "0.333334",
        True,
    )


def test_zero_parts_are_left_out_and_zero_total_gives_none() -> None:
    weights = {key(team="a"): Fraction(1), key(team="b"): Fraction(0)}
    assert by_tags(allocate(Quantity(Decimal(5), False), weights)) == {"team=a": "5"}
    assert allocate(Quantity(Decimal(0), False), weights) == []
    assert allocate(Quantity(Decimal(5), False), {}) == []


def test_all_zero_weights_split_evenly() -> None:
    weights = {key(team="a"): Fraction(0), key(team="b"): Fraction(0)}
    assert by_tags(allocate(Quantity(Decimal(3), False), weights)) == {"team=a": "2", "team=b": "1"}


def test_more_tag_sets_than_aws_allows_are_folded_without_loss() -> None:
    weights = {key(pod=f"p{i:05d}"): Fraction(i + 1) for i in range(MAX_ALLOCATIONS + 100)}
    total = Quantity(Decimal(1_000_000), False)
    result = allocate(total, weights)
    assert len(result) == MAX_ALLOCATIONS
    assert sum(a.quantity.units() for a in result) == 1_000_000
    assert (("pod", "other"),) in {a.tags for a in result}


def test_complete_gives_the_rest_to_the_untagged_bucket() -> None:
    total = Quantity(Decimal(9), False)
    partial = [Allocation(normalise_tags({"team": "a"}), Quantity(Decimal(4), False))]
    result = complete(total, partial)
    assert by_tags(result) == {"": "5", "team=a": "4"}
    untagged = next(a for a in result if not a.tags)
    assert (untagged.quantity.value, untagged.quantity.decimal) == (Decimal(5), False)
    with pytest.raises(AllocationError, match="exceed"):
        complete(Quantity(Decimal(3), False), partial)


def test_merge_adds_per_tag_set() -> None:
    a = [Allocation(normalise_tags({"t": "x"}), Quantity(Decimal(2), False))]
    b = [
        Allocation(normalise_tags({"t": "x"}), Quantity(Decimal(3), False)),
        Allocation(normalise_tags({"t": "y"}), Quantity(Decimal(1), False)),
    ]
    assert by_tags(merge(False, a, b)) == {"t=x": "5", "t=y": "1"}
    with pytest.raises(AllocationError, match="same quantity type"):
        merge(True, a, b)


@pytest.mark.parametrize(
    ("tags", "message"),
    [
        ({f"k{i}": "v" for i in range(6)}, "at most 5 tags"),
        ({"k" * 101: "v"}, "tag key"),
        ({"team": ""}, "tag value"),
        ({"team": "v" * 257}, "tag value"),
        ({"team": "caf\u00e9"}, "tag value"),
        ({"te~am": "v"}, "tag key"),
    ],
)
def test_invalid_tags_are_refused(tags: dict[str, str], message: str) -> None:
    with pytest.raises(AllocationError, match=message):
        normalise_tags(tags)


def test_tag_value_sanitises_label_values() -> None:
    assert tag_value(None) == "none"
    assert tag_value("") == "none"
    assert tag_value("team-a.b_c") == "team-a.b_c"
    assert tag_value("caf\u00e9") == "caf_"
    assert parse_tag_key(key(b="2", a="1")) == (("a", "1"), ("b", "2"))


def test_check_allocations_catches_wrong_sums() -> None:
    total = Quantity(Decimal(3), False)
    wrong = [Allocation(normalise_tags({"t": "x"}), Quantity(Decimal(2), False))]
    with pytest.raises(AllocationError, match="sum to 2"):
        check_allocations(total, wrong)


@given(
    units=st.integers(min_value=0, max_value=2**31 - 1),
    decimal=st.booleans(),
    weights=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=40),
)
def test_parts_sum_exactly_and_each_is_within_one_unit_of_its_share(
    units: int, decimal: bool, weights: list[int]
) -> None:
    total = Quantity.from_units(units, decimal)
    keyed = {key(part=f"p{i}"): Fraction(w) for i, w in enumerate(weights)}
    result = allocate(total, keyed)
    assert sum(a.quantity.units() for a in result) == units
    weight_sum = sum(keyed.values()) or len(keyed)
    for a in result:
        w = keyed[tag_key(a.tags)] if sum(keyed.values()) else Fraction(1)
        share = Fraction(units) * w / weight_sum
        assert math.floor(share) <= a.quantity.units() <= math.ceil(share)
        assert a.quantity.decimal is decimal
