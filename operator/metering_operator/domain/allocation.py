"""Split an hour's quantity between allocation tag sets so the parts sum exactly to the total.

MeterUsage ``UsageAllocations`` must sum exactly to the request's quantity and use the same
quantity type (``AllocatedUsageQuantity`` with ``UsageQuantity``, ``...AsDecimal`` with
``...AsDecimal``). Proportional shares of an integer (or of 10^-6 units) almost never come out
whole, so the split uses the largest-remainder method: every tag set gets the floor of its exact
share, and the units left over go one each to the largest remainders (ties broken by the tag
set's canonical key, so the split is deterministic: a resend after a crash is byte-identical).

AWS limits, enforced here: 1..2500 entries, each with a unique tag set of up to 5 tags (no tags:
the untagged bucket), keys 1..100 and values 1..256 characters of ``[a-zA-Z0-9+ -=._:\\/@]``.
More than 2500 tag sets are folded: the largest 2499 keep their own entry and the rest share
one ``other`` entry (every tag value ``other``), so no usage is dropped.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

from metering_operator.domain.aggregation import Quantity

MAX_ALLOCATIONS = 2500
MAX_TAGS = 5
MAX_KEY_LENGTH = 100
MAX_VALUE_LENGTH = 256
# The AWS model's own pattern (botocore TagKey/TagValue): note that " -=" is a character range.
TAG_PATTERN = re.compile(r"^[a-zA-Z0-9+ -=._:\/@]+$")
_SAFE_CHARS = re.compile(r"[^a-zA-Z0-9+ \-=._:/@]")
# Tag value used when a pod lacks the label a tag reads (AWS requires 1..256 characters).
MISSING_VALUE = "none"
OVERFLOW_VALUE = "other"

TagSet = tuple[tuple[str, str], ...]


class AllocationError(ValueError):
    """Tags or weights AWS would refuse, or that cannot be split."""


def normalise_tags(tags: Mapping[str, str] | Iterable[tuple[str, str]]) -> TagSet:
    """A validated tag set in canonical (sorted) order."""
    pairs = list(tags.items()) if isinstance(tags, Mapping) else list(tags)
    # No tags at all is AWS's "untagged bucket" (Tags left out); otherwise 1..5 tags.
    if len(pairs) > MAX_TAGS:
        raise AllocationError(f"an allocation has at most {MAX_TAGS} tags, got {len(pairs)}")
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise AllocationError(f"duplicate tag keys in {keys}")
    for key, value in pairs:
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not TAG_PATTERN.match(key):
            raise AllocationError(
                f"tag key {key!r} must be 1..{MAX_KEY_LENGTH} chars of {TAG_PATTERN.pattern}"
            )
        if not 1 <= len(value) <= MAX_VALUE_LENGTH or not TAG_PATTERN.match(value):
            raise AllocationError(
                f"tag value {value!r} for {key!r} must be 1..{MAX_VALUE_LENGTH} chars "
                f"of {TAG_PATTERN.pattern}"
            )
    return tuple(sorted(pairs))


def tag_value(raw: str | None) -> str:
    """Make a label value or namespace name a valid tag value (they already are, bar emptiness)."""
    if not raw:
        return MISSING_VALUE
    return _SAFE_CHARS.sub("_", raw)[:MAX_VALUE_LENGTH]


def tag_key(tags: TagSet) -> str:
    """Canonical string form of a tag set, used as a mapping key and in status."""
    return json.dumps([list(p) for p in tags], separators=(",", ":"))


def parse_tag_key(key: str) -> TagSet:
    try:
        pairs = json.loads(key)
        return normalise_tags([(str(k), str(v)) for k, v in pairs])
    except (ValueError, TypeError) as exc:
        raise AllocationError(f"malformed tag set key {key!r}: {exc}") from None


@dataclass(frozen=True)
class Allocation:
    tags: TagSet
    quantity: Quantity


def allocate(
    total: Quantity, weights: Mapping[str, Fraction], max_entries: int = MAX_ALLOCATIONS
) -> list[Allocation]:
    """Split ``total`` between tag sets (keys from :func:`tag_key`) in proportion to ``weights``.

    Zero-quantity entries are left out (they add nothing and count against the limit); an empty
    list means "send no UsageAllocations". With no positive weight at all but a positive total
    (usage carried in from an earlier hour while nothing runs now), the total is split evenly.
    """
    if max_entries < 1:
        raise AllocationError("max_entries must be >= 1")
    if not weights:
        return []
    for key, weight in weights.items():
        if weight < 0:
            raise AllocationError(f"negative weight {weight} for tag set {key}")
    folded = _fold(weights, max_entries)
    units = total.units()
    if units == 0:
        return []
    weight_sum = sum(folded.values(), Fraction(0))
    if weight_sum == 0:
        folded = dict.fromkeys(folded, Fraction(1))
        weight_sum = Fraction(len(folded))
    shares = {key: Fraction(units) * w / weight_sum for key, w in folded.items()}
    floors = {key: math.floor(s) for key, s in shares.items()}
    left = units - sum(floors.values())
    # Largest remainder first; the key breaks ties so the result never depends on dict order.
    for key in sorted(shares, key=lambda k: (-(shares[k] - floors[k]), k))[:left]:
        floors[key] += 1
    result = [
        Allocation(parse_tag_key(key), Quantity.from_units(n, total.decimal))
        for key, n in sorted(floors.items())
        if n > 0
    ]
    check_allocations(total, result)
    return result


def _fold(weights: Mapping[str, Fraction], max_entries: int) -> dict[str, Fraction]:
    if len(weights) <= max_entries:
        return dict(weights)
    ranked = sorted(weights, key=lambda k: (-weights[k], k))
    kept = {key: weights[key] for key in ranked[: max_entries - 1]}
    rest = ranked[max_entries - 1 :]
    keys = sorted({k for key in rest for k, _ in parse_tag_key(key)})
    other = tag_key(normalise_tags([(k, OVERFLOW_VALUE) for k in keys][:MAX_TAGS]))
    kept[other] = kept.get(other, Fraction(0)) + sum((weights[k] for k in rest), Fraction(0))
    return kept


def merge(decimal: bool, first: Iterable[Allocation], second: Iterable[Allocation]) -> list[Allocation]:
    """Add two allocation lists per tag set (carried-over usage joining an hour's own).

    The result sums to the sum of both inputs; :func:`complete` then checks it against a total.
    """
    sums: dict[TagSet, int] = {}
    for item in [*first, *second]:
        if item.quantity.decimal != decimal:
            raise AllocationError("allocations must use the same quantity type as the total")
        sums[item.tags] = sums.get(item.tags, 0) + item.quantity.units()
    result = [Allocation(tags, Quantity.from_units(n, decimal)) for tags, n in sorted(sums.items()) if n > 0]
    if len(result) > MAX_ALLOCATIONS:
        total = Quantity.from_units(sum(sums.values()), decimal)
        return allocate(total, {tag_key(a.tags): Fraction(a.quantity.units()) for a in result})
    return result


def complete(total: Quantity, allocations: list[Allocation]) -> list[Allocation]:
    """Give any unallocated rest of ``total`` to the untagged bucket, so the parts sum exactly."""
    if not allocations:
        return []
    rest = total.units() - sum(a.quantity.units() for a in allocations)
    if rest < 0:
        raise AllocationError(f"allocations exceed the total {total}")
    if rest == 0:
        check_allocations(total, allocations)
        return allocations
    completed = merge(total.decimal, allocations, [Allocation((), Quantity.from_units(rest, total.decimal))])
    check_allocations(total, completed)
    return completed


def check_allocations(total: Quantity, allocations: Iterable[Allocation]) -> None:
    """Raise unless ``allocations`` is a valid UsageAllocations list for ``total`` (or empty)."""
    items = list(allocations)
    if not items:
        return
    if len(items) > MAX_ALLOCATIONS:
        raise AllocationError(f"{len(items)} allocations exceed the limit of {MAX_ALLOCATIONS}")
    if len({a.tags for a in items}) != len(items):
        raise AllocationError("allocation tag sets must be unique")
    if any(a.quantity.decimal != total.decimal for a in items):
        raise AllocationError("allocations must use the same quantity type as the total")
    if sum(a.quantity.units() for a in items) != total.units():
        raise AllocationError(
            f"allocations sum to {sum(a.quantity.units() for a in items)} units, not {total}"
        )
