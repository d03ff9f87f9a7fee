"""Typed requests and results for the four AWS Marketplace Metering Service operations.

The shapes follow botocore's ``meteringmarketplace`` 2016-01-14 model field by field: each model's
aliases are the wire member names, so ``to_boto()`` yields keyword arguments for the boto3 client
method and ``from_boto()`` reads its response dict. Validation repeats the model's constraints
(lengths, patterns, ranges) plus the documented cross-field rules botocore cannot check (exactly
one quantity type, allocations summing exactly to the quantity in the same type, unique tag sets,
one customer identifier per usage record). A bad request therefore fails here, with a message that
names the field, instead of as a ``ValidationException`` or a billing surprise after a round trip.

Decimal quantities are :class:`~decimal.Decimal`, never ``float``: AWS compares quantities by value
with six decimal places, and a binary float cannot say 0.1 exactly. Formatting is exact; a value
with more than six significant decimal places is refused rather than silently rounded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    model_validator,
)

from metering_operator.domain.clock import ensure_utc

# Patterns and limits copied from botocore's service-2.json for meteringmarketplace.
PRODUCT_CODE_PATTERN = r"^[-a-zA-Z0-9/=:_.@]*$"
DECIMAL_QUANTITY_PATTERN = r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$"
# "+ -=" is a character range (space to '='), exactly as AWS wrote it; kept verbatim so the
# client accepts precisely what the service accepts.
TAG_PATTERN = r"^[a-zA-Z0-9+ -=._:\/@]+$"
CUSTOMER_ACCOUNT_ID_PATTERN = r"^[0-9]+$"
LICENSE_ARN_PATTERN = (
    r"^arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:"
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}$"
)
MAX_QUANTITY = 2_147_483_647
DECIMAL_PLACES = 6
MAX_ALLOCATIONS = 2500
MAX_TAGS = 5
MAX_BATCH_RECORDS = 25

_DECIMAL_RE = re.compile(DECIMAL_QUANTITY_PATTERN)
_SIX_PLACES = Decimal(1).scaleb(-DECIMAL_PLACES)


def format_decimal_quantity(value: Decimal) -> str:
    """The wire string for a decimal quantity, exactly equal in value to ``value``.

    Trailing zeros beyond six places are dropped (``1.2300000`` -> ``1.230000``), exponents are
    expanded (``1E+2`` -> ``100``); anything that cannot be written in the AWS pattern without
    changing its value raises :class:`ValueError`.
    """
    if not value.is_finite():
        raise ValueError(f"decimal quantity must be finite, got {value}")
    if value.is_signed():
        if value != 0:
            raise ValueError(f"decimal quantity must not be negative, got {value}")
        value = abs(value)  # -0 is 0
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -DECIMAL_PLACES:
        try:
            quantized = value.quantize(_SIX_PLACES)
        except InvalidOperation as exc:  # more digits than the context precision
            raise ValueError(f"decimal quantity {value} is too large") from exc
        if quantized != value:
            raise ValueError(
                f"decimal quantity {value} has more than {DECIMAL_PLACES} decimal places; "
                "round it explicitly before metering"
            )
        value = quantized
    text = format(value, "f")
    if not _DECIMAL_RE.match(text):
        raise ValueError(
            f"decimal quantity {value} does not fit AWS's format (at most 10 integer digits "
            f"and {DECIMAL_PLACES} decimal places, no leading zeros): {text!r}"
        )
    return text


def _no_float(value: Any) -> Any:
    # A float has already lost exactness before we see it (0.1 is 0.1000000000000000055...),
    # so callers must pass a Decimal, an int or a decimal string.
    if isinstance(value, float):
        raise ValueError("decimal quantities must be Decimal, int or str, not float (floats are inexact)")
    if isinstance(value, bool):
        raise ValueError("decimal quantities must be Decimal, int or str, not bool")
    return value


def _check_decimal(value: Decimal) -> Decimal:
    format_decimal_quantity(value)
    return value


DecimalQuantity = Annotated[
    Decimal,
    BeforeValidator(_no_float),
    AfterValidator(_check_decimal),
    PlainSerializer(format_decimal_quantity, return_type=str),
]
"""A non-negative decimal with at most 10 integer digits and 6 decimal places, sent as a string."""

IntQuantity = Annotated[int, Field(ge=0, le=MAX_QUANTITY, strict=True)]


def _utc(value: datetime) -> datetime:
    return ensure_utc(value)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
"""A timezone-aware datetime normalised to UTC; naive datetimes are refused."""


class _AwsModel(BaseModel):
    """Base: aliases are the AWS member names; python code may use either name."""

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    def to_boto(self) -> dict[str, Any]:
        """Keyword arguments for the boto3 client method, with unset members left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="python")


class _AwsResult(BaseModel):
    # Responses may grow members in later API versions; ignoring them keeps an old operator
    # working against a newer service.
    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="ignore")

    @classmethod
    def from_boto(cls, response: Mapping[str, Any]) -> Self:
        """Parse a boto3 response dict (``ResponseMetadata`` and unknown members are ignored)."""
        return cls.model_validate({k: v for k, v in response.items() if k != "ResponseMetadata"})


# --------------------------------------------------------------------------------------------
# Usage allocations


class Tag(_AwsModel):
    key: Annotated[str, Field(alias="Key", min_length=1, max_length=100, pattern=TAG_PATTERN)]
    value: Annotated[str, Field(alias="Value", min_length=1, max_length=256, pattern=TAG_PATTERN)]


class UsageAllocation(_AwsModel):
    """A share of a quantity for one tag set; exactly one of the two quantity members."""

    allocated_usage_quantity: IntQuantity | None = Field(default=None, alias="AllocatedUsageQuantity")
    allocated_usage_quantity_decimal: DecimalQuantity | None = Field(
        default=None, alias="AllocatedUsageQuantityAsDecimal"
    )
    tags: tuple[Tag, ...] | None = Field(default=None, alias="Tags", min_length=1, max_length=MAX_TAGS)

    @model_validator(mode="after")
    def _one_quantity(self) -> Self:
        if (self.allocated_usage_quantity is None) == (self.allocated_usage_quantity_decimal is None):
            raise ValueError(
                "a UsageAllocation needs exactly one of AllocatedUsageQuantity or "
                "AllocatedUsageQuantityAsDecimal"
            )
        return self

    @property
    def is_decimal(self) -> bool:
        return self.allocated_usage_quantity_decimal is not None

    @property
    def quantity(self) -> Decimal:
        """The allocated quantity as a Decimal, whichever member carries it."""
        if self.allocated_usage_quantity_decimal is not None:
            return self.allocated_usage_quantity_decimal
        return Decimal(self.allocated_usage_quantity or 0)

    def tag_set(self) -> frozenset[tuple[str, str]]:
        return frozenset((tag.key, tag.value) for tag in self.tags or ())


def _check_allocations(
    allocations: Sequence[UsageAllocation] | None, quantity: Decimal, decimal_request: bool, what: str
) -> None:
    if allocations is None:
        return
    kinds = {allocation.is_decimal for allocation in allocations}
    if kinds != {decimal_request}:
        wanted = "AllocatedUsageQuantityAsDecimal" if decimal_request else "AllocatedUsageQuantity"
        raise ValueError(f"{what}: every allocation must use {wanted}, the same quantity type as the request")
    total = sum((allocation.quantity for allocation in allocations), Decimal(0))
    if total != quantity:
        raise ValueError(f"{what}: allocations sum to {total}, not to the quantity {quantity}")
    seen: set[frozenset[tuple[str, str]]] = set()
    for allocation in allocations:
        tag_set = allocation.tag_set()
        if tag_set in seen:
            raise ValueError(f"{what}: two allocations have the same tag set {sorted(tag_set)}")
        seen.add(tag_set)


Allocations = Annotated[tuple[UsageAllocation, ...], Field(min_length=1, max_length=MAX_ALLOCATIONS)]

ProductCode = Annotated[str, Field(max_length=255, pattern=PRODUCT_CODE_PATTERN)]
Dimension = Annotated[str, Field(min_length=1, max_length=255)]


# --------------------------------------------------------------------------------------------
# RegisterUsage


class RegisterUsageRequest(_AwsModel):
    product_code: ProductCode = Field(alias="ProductCode", min_length=1)
    public_key_version: int = Field(alias="PublicKeyVersion", ge=1, strict=True)
    nonce: str | None = Field(default=None, alias="Nonce", max_length=255)


class RegisterUsageResult(_AwsResult):
    signature: str = Field(alias="Signature", min_length=1)
    public_key_rotation_timestamp: UtcDatetime | None = Field(
        default=None, alias="PublicKeyRotationTimestamp"
    )


# --------------------------------------------------------------------------------------------
# MeterUsage


class MeterUsageRequest(_AwsModel):
    """One hour of one dimension. Send either ``usage_quantity`` or ``usage_quantity_decimal``.

    AWS defaults a missing quantity to 0; this model refuses that, because an accidental 0 for a
    closed hour is billed as 0 and blocks the real value for that hour.
    """

    product_code: ProductCode = Field(alias="ProductCode", min_length=1)
    timestamp: UtcDatetime = Field(alias="Timestamp")
    usage_dimension: Dimension = Field(alias="UsageDimension")
    usage_quantity: IntQuantity | None = Field(default=None, alias="UsageQuantity")
    usage_quantity_decimal: DecimalQuantity | None = Field(default=None, alias="UsageQuantityAsDecimal")
    dry_run: bool | None = Field(default=None, alias="DryRun")
    usage_allocations: Allocations | None = Field(default=None, alias="UsageAllocations")
    client_token: str | None = Field(default=None, alias="ClientToken", min_length=1, max_length=64)

    @model_validator(mode="after")
    def _quantity_rules(self) -> Self:
        if (self.usage_quantity is None) == (self.usage_quantity_decimal is None):
            raise ValueError("MeterUsage needs exactly one of UsageQuantity or UsageQuantityAsDecimal")
        _check_allocations(self.usage_allocations, self.quantity, self.is_decimal, "MeterUsage")
        return self

    @property
    def is_decimal(self) -> bool:
        return self.usage_quantity_decimal is not None

    @property
    def quantity(self) -> Decimal:
        if self.usage_quantity_decimal is not None:
            return self.usage_quantity_decimal
        return Decimal(self.usage_quantity or 0)


class MeterUsageResult(_AwsResult):
    """``metering_record_id`` is None only for a successful dry run (``dry_run`` True)."""

    metering_record_id: str | None = Field(default=None, alias="MeteringRecordId")
    dry_run: bool = False


# --------------------------------------------------------------------------------------------
# BatchMeterUsage


class UsageRecordResultStatus(StrEnum):
    SUCCESS = "Success"
    CUSTOMER_NOT_SUBSCRIBED = "CustomerNotSubscribed"
    DUPLICATE_RECORD = "DuplicateRecord"


class UsageRecord(_AwsModel):
    """One customer's usage of one dimension for one hour (BatchMeterUsage)."""

    timestamp: UtcDatetime = Field(alias="Timestamp")
    dimension: Dimension = Field(alias="Dimension")
    quantity: IntQuantity | None = Field(default=None, alias="Quantity")
    quantity_decimal: DecimalQuantity | None = Field(default=None, alias="QuantityAsDecimal")
    usage_allocations: Allocations | None = Field(default=None, alias="UsageAllocations")
    customer_identifier: str | None = Field(default=None, alias="CustomerIdentifier", max_length=255)
    customer_aws_account_id: str | None = Field(
        default=None,
        alias="CustomerAWSAccountId",
        min_length=1,
        max_length=255,
        pattern=CUSTOMER_ACCOUNT_ID_PATTERN,
    )
    license_arn: str | None = Field(default=None, alias="LicenseArn", pattern=LICENSE_ARN_PATTERN)

    @model_validator(mode="after")
    def _record_rules(self) -> Self:
        if self.quantity is not None and self.quantity_decimal is not None:
            raise ValueError("a UsageRecord takes Quantity or QuantityAsDecimal, not both")
        if (self.customer_identifier is None) == (self.customer_aws_account_id is None):
            raise ValueError("a UsageRecord needs exactly one of CustomerIdentifier or CustomerAWSAccountId")
        _check_allocations(self.usage_allocations, self.value, self.is_decimal, "UsageRecord")
        return self

    @property
    def is_decimal(self) -> bool:
        return self.quantity_decimal is not None

    @property
    def value(self) -> Decimal:
        """The record's quantity as a Decimal (AWS defaults a missing quantity to 0)."""
        if self.quantity_decimal is not None:
            return self.quantity_decimal
        return Decimal(self.quantity or 0)


class BatchMeterUsageRequest(_AwsModel):
    """Up to 25 records. ``product_code`` is only for legacy ``CustomerIdentifier`` integrations.

    An empty batch is refused although the model allows it: sending one is always a bug.
    """

    usage_records: tuple[UsageRecord, ...] = Field(
        alias="UsageRecords", min_length=1, max_length=MAX_BATCH_RECORDS
    )
    product_code: ProductCode | None = Field(default=None, alias="ProductCode")


class UsageRecordResult(_AwsResult):
    usage_record: UsageRecord | None = Field(default=None, alias="UsageRecord")
    metering_record_id: str | None = Field(default=None, alias="MeteringRecordId")
    status: UsageRecordResultStatus | None = Field(default=None, alias="Status")


class BatchMeterUsageResult(_AwsResult):
    results: tuple[UsageRecordResult, ...] = Field(default=(), alias="Results")
    unprocessed_records: tuple[UsageRecord, ...] = Field(default=(), alias="UnprocessedRecords")


# --------------------------------------------------------------------------------------------
# ResolveCustomer


class ResolveCustomerRequest(_AwsModel):
    registration_token: str = Field(alias="RegistrationToken", min_length=1)


class CustomerMetadata(_AwsResult):
    agreement_id: str | None = Field(default=None, alias="AgreementId")


class ResolveCustomerResult(_AwsResult):
    customer_identifier: str | None = Field(default=None, alias="CustomerIdentifier")
    product_code: str | None = Field(default=None, alias="ProductCode")
    customer_aws_account_id: str | None = Field(default=None, alias="CustomerAWSAccountId")
    license_arn: str | None = Field(default=None, alias="LicenseArn")
    metadata: CustomerMetadata | None = Field(default=None, alias="Metadata")
