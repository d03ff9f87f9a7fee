"""Hourly aggregation of a dimension's sampled value, and rounding to what MeterUsage accepts.

A dimension is sampled every interval; over each UTC hour its samples become one quantity:

* ``Average``: time-weighted over the whole hour. Between two samples the earlier value holds
  ("a gap counts as the last known value"), so an operator that misses samples, or restarts,
  still bills what was running. Time before the first known value of the hour counts as zero:
  nothing was observed running (the product did not exist yet). The value in force when the
  previous hour closed is carried in as the value at the start of the next one. The average is
  the integral divided by the full hour, i.e. it is the usage in "unit-hours".
* ``Maximum``: the largest value in force at any time during the hour (including the carried-in one).
* ``Last``: the value in force when the hour ends.

Arithmetic is exact: sample values are finite Decimals, times are whole microseconds, the integral
is kept as an exact Decimal (an inexact step raises instead of silently rounding), and the final
division by 3600 s is done with :class:`fractions.Fraction` so rounding happens exactly once, at
the end, by the dimension's ``rounding`` rule.

The aggregate also tracks the same integral split by allocation tag set ("parts"), which
:mod:`metering_operator.domain.allocation` uses as weights.
"""

from __future__ import annotations

import decimal
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from metering_operator.domain.clock import ensure_utc, hour_start

# The spec's enums (one definition, in the CRD models), re-exported for the ledger and tests.
from metering_operator.domain.product import Aggregation as Aggregation
from metering_operator.domain.product import Rounding as Rounding

HOUR = timedelta(hours=1)
_MICROS_PER_SECOND = 1_000_000
_SECONDS_PER_HOUR = 3600
# MeterUsage limits: UsageQuantity is an int32 >= 0; UsageQuantityAsDecimal has at most 10 integer
# digits and 6 decimal places (pattern ^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$).
MAX_INTEGER_QUANTITY = 2**31 - 1
MAX_DECIMAL_QUANTITY = Decimal("9999999999.999999")
DECIMAL_PLACES = 6
_DECIMAL_UNIT = Decimal(1).scaleb(-DECIMAL_PLACES)

# A wide context that traps Inexact: the integral is a sum of products of finite decimals, so
# with enough precision it is always exact; if it ever is not, fail loudly rather than bill wrong.
_EXACT = decimal.Context(prec=120, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])


class AggregationError(ValueError):
    """A sample or a time that cannot belong to the aggregate (wrong hour, out of order, negative)."""


class QuantityOutOfRange(ValueError):
    """The rounded quantity exceeds what MeterUsage accepts."""


@dataclass(frozen=True)
class Quantity:
    """A rounded quantity ready for MeterUsage: an integer or a 6-place decimal, never both."""

    value: Decimal
    decimal: bool

    def __post_init__(self) -> None:
        if not self.value.is_finite() or self.value < 0:
            raise QuantityOutOfRange(f"quantity must be a finite number >= 0, not {self.value}")
        if self.decimal:
            if self.value > MAX_DECIMAL_QUANTITY:
                raise QuantityOutOfRange(f"decimal quantity {self.value} exceeds {MAX_DECIMAL_QUANTITY}")
            if self.value != self.value.quantize(_DECIMAL_UNIT, rounding=decimal.ROUND_DOWN):
                raise QuantityOutOfRange(f"decimal quantity {self.value} has more than 6 decimal places")
        else:
            if self.value != self.value.to_integral_value():
                raise QuantityOutOfRange(f"integer quantity {self.value} is not a whole number")
            if self.value > MAX_INTEGER_QUANTITY:
                raise QuantityOutOfRange(f"integer quantity {self.value} exceeds {MAX_INTEGER_QUANTITY}")

    @classmethod
    def parse(cls, text: str, decimal_: bool) -> Quantity:
        try:
            value = Decimal(text)
        except decimal.InvalidOperation:
            raise QuantityOutOfRange(f"not a number: {text!r}") from None
        return cls(value, decimal_)

    @classmethod
    def zero(cls, decimal_: bool) -> Quantity:
        return cls(Decimal(0), decimal_)

    def __str__(self) -> str:
        """Canonical text: ``17``, ``2.5`` (no exponent, no trailing zeros); matches the AWS pattern."""
        if not self.decimal:
            return str(int(self.value))
        text = format(self.value.normalize(), "f")
        return text

    def units(self) -> int:
        """The quantity in its smallest unit (1, or 10^-6 for decimals)."""
        scaled = self.value if not self.decimal else self.value.scaleb(DECIMAL_PLACES)
        return int(scaled)

    @classmethod
    def from_units(cls, units: int, decimal_: bool) -> Quantity:
        value = Decimal(units) if not decimal_ else Decimal(units).scaleb(-DECIMAL_PLACES)
        return cls(value, decimal_)

    def __add__(self, other: Quantity) -> Quantity:
        if other.decimal != self.decimal:
            raise TypeError("cannot add an integer quantity to a decimal one")
        return Quantity.from_units(self.units() + other.units(), self.decimal)


def round_quantity(value: Fraction | Decimal | int, rounding: Rounding | str) -> Quantity:
    """Round an exact value by the dimension's rule. ``Nearest`` and ``Decimal`` round half up."""
    exact = Fraction(value)
    if exact < 0:
        raise QuantityOutOfRange(f"usage cannot be negative: {value}")
    rule = Rounding(rounding)
    if rule is Rounding.UP:
        return Quantity(Decimal(math.ceil(exact)), False)
    if rule is Rounding.DOWN:
        return Quantity(Decimal(math.floor(exact)), False)
    if rule is Rounding.NEAREST:
        return Quantity(Decimal(math.floor(exact + Fraction(1, 2))), False)
    micro = math.floor(exact * 10**DECIMAL_PLACES + Fraction(1, 2))
    return Quantity.from_units(micro, True)


def _seconds(delta: timedelta) -> Decimal:
    micros = delta // timedelta(microseconds=1)
    return _EXACT.divide(Decimal(micros), Decimal(_MICROS_PER_SECOND))


@dataclass(frozen=True)
class Track:
    """One series' running state within the hour (the dimension total, or one tag set's part)."""

    integral: Decimal = Decimal(0)  # value x seconds over the known part of the hour
    last_value: Decimal | None = None
    maximum: Decimal | None = None

    def advance(self, seconds: Decimal) -> Track:
        """Extend the last value over ``seconds`` (a gap counts as the last known value)."""
        if self.last_value is None or seconds == 0:
            return self
        integral = _EXACT.add(self.integral, _EXACT.multiply(self.last_value, seconds))
        return replace(self, integral=integral)

    def set_value(self, value: Decimal) -> Track:
        maximum = value if self.maximum is None else max(self.maximum, value)
        return replace(self, last_value=value, maximum=maximum)


@dataclass(frozen=True)
class HourAggregate:
    """The running aggregate of one dimension over one UTC hour (the "open hour")."""

    hour: datetime
    last_at: datetime | None = None
    total: Track = field(default_factory=Track)
    parts: Mapping[str, Track] = field(default_factory=dict)
    samples: int = 0

    @property
    def end(self) -> datetime:
        return self.hour + HOUR

    @classmethod
    def start(
        cls,
        hour: datetime,
        carried: Decimal | None = None,
        carried_parts: Mapping[str, Decimal] | None = None,
    ) -> HourAggregate:
        """A new hour; ``carried`` is the value in force when the previous hour ended."""
        hour = ensure_utc(hour)
        if hour != hour_start(hour):
            raise AggregationError(f"{hour.isoformat()} is not the start of a UTC hour")
        if carried is None:
            return cls(hour=hour)
        parts = {key: Track().set_value(v) for key, v in (carried_parts or {}).items()}
        return cls(hour=hour, last_at=hour, total=Track().set_value(carried), parts=parts)

    def observe(
        self, at: datetime, value: Decimal, parts: Mapping[str, Decimal] | None = None
    ) -> HourAggregate:
        """Add a sample taken at ``at``. ``parts`` splits ``value`` by allocation tag set."""
        at = ensure_utc(at)
        if not (self.hour <= at < self.end):
            raise AggregationError(f"sample at {at.isoformat()} is outside the hour {self.hour.isoformat()}")
        if self.last_at is not None and at < self.last_at:
            raise AggregationError(
                f"sample at {at.isoformat()} is older than the last one ({self.last_at.isoformat()})"
            )
        _check_value(value)
        new_parts = dict(parts or {})
        for key, part in new_parts.items():
            _check_value(part, key)
        seconds = _seconds(at - self.last_at) if self.last_at is not None else Decimal(0)
        tracks = {key: track.advance(seconds) for key, track in self.parts.items()}
        # A tag set that disappeared is now worth zero; it keeps its integral as a weight.
        for key in set(tracks) | set(new_parts):
            tracks[key] = tracks.get(key, Track()).set_value(new_parts.get(key, Decimal(0)))
        return HourAggregate(
            hour=self.hour,
            last_at=at,
            total=self.total.advance(seconds).set_value(value),
            parts=tracks,
            samples=self.samples + 1,
        )

    def closed(self) -> HourAggregate:
        """The aggregate with the last value extended to the end of the hour."""
        if self.last_at is None:
            return self
        seconds = _seconds(self.end - self.last_at)
        return HourAggregate(
            hour=self.hour,
            last_at=self.end,
            total=self.total.advance(seconds),
            parts={key: track.advance(seconds) for key, track in self.parts.items()},
            samples=self.samples,
        )

    def value(self, aggregation: Aggregation | str) -> Fraction:
        """The exact aggregated value over the whole hour (closes the hour first)."""
        return _aggregate(self.closed().total, Aggregation(aggregation))

    def part_weights(self, aggregation: Aggregation | str) -> dict[str, Fraction]:
        """Weights for splitting the hour's quantity between tag sets."""
        closed = self.closed()
        rule = Aggregation(aggregation)
        if rule is Aggregation.LAST:
            return {key: Fraction(t.last_value or 0) for key, t in closed.parts.items()}
        # Average and Maximum split by each tag set's share of the usage integral.
        return {key: Fraction(t.integral) for key, t in closed.parts.items()}

    def next_hour(self) -> HourAggregate:
        """The following hour, starting from the values in force when this one ends."""
        carried_parts = {k: t.last_value for k, t in self.parts.items() if t.last_value}
        return HourAggregate.start(
            self.end,
            self.total.last_value,
            {k: v for k, v in carried_parts.items() if v is not None},
        )


def _aggregate(track: Track, rule: Aggregation) -> Fraction:
    if rule is Aggregation.AVERAGE:
        return Fraction(track.integral) / _SECONDS_PER_HOUR
    if rule is Aggregation.MAXIMUM:
        return Fraction(track.maximum or 0)
    return Fraction(track.last_value or 0)


def _check_value(value: Decimal, key: str | None = None) -> None:
    if not isinstance(value, Decimal) or not value.is_finite() or value < 0:
        where = f" for {key}" if key else ""
        raise AggregationError(f"sample value{where} must be a finite Decimal >= 0, not {value!r}")
