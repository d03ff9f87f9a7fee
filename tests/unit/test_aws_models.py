"""Typed Metering requests/results: validation, exact decimals, and agreement with botocore's model.

``to_boto()`` output is checked with botocore's own parameter validator and JSON serializer (real
botocore code, no network), so a model that drifts from the wire shape fails here.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import botocore.session
import pytest
from botocore.serialize import create_serializer
from botocore.validate import ParamValidator
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from metering_operator.aws.models import (
    DECIMAL_QUANTITY_PATTERN,
    BatchMeterUsageRequest,
    BatchMeterUsageResult,
    MeterUsageRequest,
    MeterUsageResult,
    RegisterUsageRequest,
    RegisterUsageResult,
    ResolveCustomerRequest,
    ResolveCustomerResult,
    Tag,
    UsageAllocation,
    UsageRecord,
    UsageRecordResultStatus,
    format_decimal_quantity,
)

HOUR = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
PRODUCT = "1fszvu527waovqeuhpkyx2b5d"

_MODEL = botocore.session.get_session().get_service_model("meteringmarketplace")


def wire(operation: str, params: dict[str, Any]) -> dict[str, Any]:
    """What botocore would put on the wire for ``params`` (after its own validation)."""
    shape = _MODEL.operation_model(operation).input_shape
    report = ParamValidator().validate(params, shape)
    assert not report.has_errors(), report.generate_report()
    serialized = create_serializer("json").serialize_to_request(params, _MODEL.operation_model(operation))
    result: dict[str, Any] = json.loads(serialized["body"])
    return result


# -- decimal quantities -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("17"), "17"),
        (Decimal("17.00"), "17.00"),
        (Decimal("0"), "0"),
        (Decimal("-0"), "0"),
        (Decimal("0.000001"), "0.000001"),
        (Decimal("1E+2"), "100"),
        (Decimal("1.2300000"), "1.230000"),
        (Decimal("2.50000000000"), "2.500000"),
        (Decimal("9999999999.999999"), "9999999999.999999"),
    ],
)
def test_decimal_quantity_formats_exactly(value: Decimal, expected: str) -> None:
    assert format_decimal_quantity(value) == expected
    assert Decimal(expected) == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (Decimal("0.0000001"), "more than 6 decimal places"),
        (Decimal("1.1234567"), "more than 6 decimal places"),
        (Decimal("-1"), "negative"),
        (Decimal("10000000000"), "does not fit"),
        (Decimal("NaN"), "finite"),
        (Decimal("Infinity"), "finite"),
    ],
)
def test_decimal_quantity_refuses_what_aws_cannot_take(value: Decimal, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        format_decimal_quantity(value)


def meter(**overrides: Any) -> MeterUsageRequest:
    fields: dict[str, Any] = {
        "product_code": PRODUCT,
        "timestamp": HOUR,
        "usage_dimension": "replicas",
        "usage_quantity_decimal": Decimal("2.5"),
    }
    fields.update(overrides)
    return MeterUsageRequest(**fields)


def test_meter_usage_decimal_goes_on_the_wire_as_the_aws_string() -> None:
    params = meter(usage_quantity_decimal="17.000000").to_boto()
    assert params == {
        "ProductCode": PRODUCT,
        "Timestamp": HOUR,
        "UsageDimension": "replicas",
        "UsageQuantityAsDecimal": "17.000000",
    }
    body = wire("MeterUsage", params)
    assert body["UsageQuantityAsDecimal"] == "17.000000"
    assert body["Timestamp"] == HOUR.timestamp()


def test_meter_usage_refuses_float_quantities() -> None:
    with pytest.raises(ValidationError, match="not float"):
        meter(usage_quantity_decimal=0.1)


def test_meter_usage_needs_exactly_one_quantity() -> None:
    with pytest.raises(ValidationError, match="exactly one of UsageQuantity"):
        meter(usage_quantity=3)
    with pytest.raises(ValidationError, match="exactly one of UsageQuantity"):
        meter(usage_quantity_decimal=None)


def test_meter_usage_integer_quantity_range() -> None:
    assert meter(usage_quantity_decimal=None, usage_quantity=2_147_483_647).quantity == 2_147_483_647
    with pytest.raises(ValidationError):
        meter(usage_quantity_decimal=None, usage_quantity=2_147_483_648)
    with pytest.raises(ValidationError):
        meter(usage_quantity_decimal=None, usage_quantity=-1)
    with pytest.raises(ValidationError):
        meter(usage_quantity_decimal=None, usage_quantity="3")  # strict: no silent str->int


def test_meter_usage_timestamp_must_be_aware_and_is_normalised_to_utc() -> None:
    with pytest.raises(ValidationError, match="naive"):
        meter(timestamp=datetime(2026, 11, 26, 3, 0))
    plus_two = timezone(timedelta(hours=2))
    request = meter(timestamp=datetime(2026, 11, 26, 5, 0, tzinfo=plus_two))
    assert request.timestamp == HOUR
    assert request.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "field",
    [
        {"product_code": "bad code!"},
        {"product_code": ""},
        {"usage_dimension": ""},
        {"usage_dimension": "x" * 256},
        {"client_token": ""},
        {"client_token": "t" * 65},
    ],
)
def test_meter_usage_field_constraints(field: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        meter(**field)


def team(value: str) -> Tag:
    return Tag(key="team", value=value)


def test_meter_usage_with_allocations_passes_botocore_validation() -> None:
    request = meter(
        usage_quantity_decimal=Decimal("3.5"),
        usage_allocations=[
            UsageAllocation(allocated_usage_quantity_decimal=Decimal("1.25"), tags=[team("a")]),
            UsageAllocation(allocated_usage_quantity_decimal="2.250000", tags=[team("b")]),
        ],
        client_token="token-1",
        dry_run=False,
    )
    body = wire("MeterUsage", request.to_boto())
    assert body["UsageAllocations"] == [
        {"AllocatedUsageQuantityAsDecimal": "1.25", "Tags": [{"Key": "team", "Value": "a"}]},
        {"AllocatedUsageQuantityAsDecimal": "2.250000", "Tags": [{"Key": "team", "Value": "b"}]},
    ]
    assert body["ClientToken"] == "token-1"
    assert body["DryRun"] is False


def test_allocations_must_sum_exactly() -> None:
    with pytest.raises(ValidationError, match=r"sum to 3\.4"):
        meter(
            usage_quantity_decimal=Decimal("3.5"),
            usage_allocations=[
                UsageAllocation(allocated_usage_quantity_decimal=Decimal("1.2"), tags=[team("a")]),
                UsageAllocation(allocated_usage_quantity_decimal=Decimal("2.2"), tags=[team("b")]),
            ],
        )


def test_allocations_must_use_the_request_quantity_type() -> None:
    with pytest.raises(ValidationError, match="AllocatedUsageQuantityAsDecimal"):
        meter(
            usage_quantity_decimal=Decimal("3"),
            usage_allocations=[UsageAllocation(allocated_usage_quantity=3)],
        )
    with pytest.raises(ValidationError, match="AllocatedUsageQuantity,"):
        meter(
            usage_quantity_decimal=None,
            usage_quantity=3,
            usage_allocations=[UsageAllocation(allocated_usage_quantity_decimal=Decimal("3"))],
        )


def test_allocations_need_unique_tag_sets_but_tag_order_does_not_matter() -> None:
    with pytest.raises(ValidationError, match="same tag set"):
        meter(
            usage_quantity_decimal=None,
            usage_quantity=2,
            usage_allocations=[
                UsageAllocation(allocated_usage_quantity=1, tags=[Tag(key="a", value="1"), team("2")]),
                UsageAllocation(allocated_usage_quantity=1, tags=[team("2"), Tag(key="a", value="1")]),
            ],
        )
    # The untagged bucket is a tag set of its own.
    ok = meter(
        usage_quantity_decimal=None,
        usage_quantity=2,
        usage_allocations=[
            UsageAllocation(allocated_usage_quantity=1),
            UsageAllocation(allocated_usage_quantity=1, tags=[Tag(key="a", value="1")]),
        ],
    )
    assert ok.usage_allocations is not None
    assert len(ok.usage_allocations) == 2


def test_allocation_needs_exactly_one_quantity_and_at_most_five_tags() -> None:
    with pytest.raises(ValidationError, match="exactly one of AllocatedUsageQuantity"):
        UsageAllocation()
    with pytest.raises(ValidationError, match="exactly one of AllocatedUsageQuantity"):
        UsageAllocation(allocated_usage_quantity=1, allocated_usage_quantity_decimal=Decimal(1))
    with pytest.raises(ValidationError):
        UsageAllocation(allocated_usage_quantity=1, tags=[Tag(key=f"k{i}", value="v") for i in range(6)])
    with pytest.raises(ValidationError):
        UsageAllocation(allocated_usage_quantity=1, tags=[])


@pytest.mark.parametrize(
    ("key", "value", "ok"),
    [
        ("team", "a b/c:d@e.f_g=h+i-j", True),
        ("k" * 100, "v" * 256, True),
        ("k" * 101, "v", False),
        ("k", "v" * 257, False),
        ("", "v", False),
        ("k", "", False),
        ("k", "caf\u00e9", False),
        ("k", "a|b", False),
        ("k", "new\nline", False),
    ],
)
def test_tag_charset_and_lengths(key: str, value: str, ok: bool) -> None:
    if ok:
        assert Tag(key=key, value=value).to_boto() == {"Key": key, "Value": value}
    else:
        with pytest.raises(ValidationError):
            Tag(key=key, value=value)


# -- RegisterUsage --------------------------------------------------------------------------------


def test_register_usage_request_round_trip_through_botocore() -> None:
    request = RegisterUsageRequest(product_code=PRODUCT, public_key_version=1, nonce="pod-uid")
    assert wire("RegisterUsage", request.to_boto()) == {
        "ProductCode": PRODUCT,
        "PublicKeyVersion": 1,
        "Nonce": "pod-uid",
    }
    assert RegisterUsageRequest.model_validate({"ProductCode": PRODUCT, "PublicKeyVersion": 2}).to_boto() == {
        "ProductCode": PRODUCT,
        "PublicKeyVersion": 2,
    }


@pytest.mark.parametrize(
    "fields",
    [
        {"public_key_version": 0},
        {"public_key_version": True},
        {"nonce": "n" * 256},
        {"product_code": "white space"},
    ],
)
def test_register_usage_request_constraints(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {"product_code": PRODUCT, "public_key_version": 1}
    base.update(fields)
    with pytest.raises(ValidationError):
        RegisterUsageRequest(**base)


def test_register_usage_result_from_boto() -> None:
    result = RegisterUsageResult.from_boto(
        {
            "Signature": "a.b.c",
            "PublicKeyRotationTimestamp": HOUR,
            "ResponseMetadata": {"HTTPStatusCode": 200},
        }
    )
    assert result.signature == "a.b.c"
    assert result.public_key_rotation_timestamp == HOUR
    assert RegisterUsageResult.from_boto({"Signature": "x"}).public_key_rotation_timestamp is None
    with pytest.raises(ValidationError):
        RegisterUsageResult.from_boto({"ResponseMetadata": {}})


def test_meter_usage_result_from_boto() -> None:
    result = MeterUsageResult.from_boto({"MeteringRecordId": "rec-1", "ResponseMetadata": {}})
    assert result.metering_record_id == "rec-1"
    assert result.dry_run is False


# -- BatchMeterUsage ------------------------------------------------------------------------------


def record(**overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "timestamp": HOUR,
        "dimension": "users",
        "quantity": 4,
        "customer_aws_account_id": "123456789012",
    }
    fields.update(overrides)
    return UsageRecord(**fields)


def test_usage_record_needs_exactly_one_customer_id() -> None:
    with pytest.raises(ValidationError, match="exactly one of CustomerIdentifier"):
        record(customer_identifier="cust-1")
    with pytest.raises(ValidationError, match="exactly one of CustomerIdentifier"):
        record(customer_aws_account_id=None)
    with pytest.raises(ValidationError):
        record(customer_aws_account_id="12345abc")
    assert record(customer_aws_account_id=None, customer_identifier="cust-1").customer_identifier == "cust-1"


def test_usage_record_quantity_defaults_like_aws_but_not_both() -> None:
    assert record(quantity=None).value == 0
    with pytest.raises(ValidationError, match="not both"):
        record(quantity_decimal=Decimal("1"))


def test_usage_record_license_arn_pattern() -> None:
    arn = "arn:aws:license-manager::123456789012:license:l-0123456789abcdef"
    assert record(license_arn=arn).license_arn == arn
    with pytest.raises(ValidationError):
        record(license_arn="not-an-arn")


def test_batch_request_limits_and_wire_shape() -> None:
    records = [record(dimension=f"d{i}", quantity_decimal=Decimal("0.5"), quantity=None) for i in range(25)]
    request = BatchMeterUsageRequest(usage_records=records, product_code=PRODUCT)
    body = wire("BatchMeterUsage", request.to_boto())
    assert len(body["UsageRecords"]) == 25
    assert body["UsageRecords"][0] == {
        "Timestamp": HOUR.timestamp(),
        "Dimension": "d0",
        "QuantityAsDecimal": "0.5",
        "CustomerAWSAccountId": "123456789012",
    }
    with pytest.raises(ValidationError):
        BatchMeterUsageRequest(usage_records=[*records, record()])
    with pytest.raises(ValidationError):
        BatchMeterUsageRequest(usage_records=[])


def test_batch_result_from_boto_parses_records_and_statuses() -> None:
    echoed = {"Timestamp": HOUR, "Dimension": "users", "Quantity": 4, "CustomerAWSAccountId": "123456789012"}
    result = BatchMeterUsageResult.from_boto(
        {
            "Results": [
                {"UsageRecord": echoed, "MeteringRecordId": "r1", "Status": "Success"},
                {"UsageRecord": echoed, "Status": "DuplicateRecord"},
            ],
            "UnprocessedRecords": [echoed],
            "ResponseMetadata": {},
        }
    )
    assert [r.status for r in result.results] == [
        UsageRecordResultStatus.SUCCESS,
        UsageRecordResultStatus.DUPLICATE_RECORD,
    ]
    assert result.results[0].usage_record == record()
    assert result.unprocessed_records == (record(),)
    assert BatchMeterUsageResult.from_boto({}).results == ()


# -- ResolveCustomer ------------------------------------------------------------------------------


def test_resolve_customer_shapes() -> None:
    assert wire("ResolveCustomer", ResolveCustomerRequest(registration_token="tok").to_boto()) == {
        "RegistrationToken": "tok"
    }
    with pytest.raises(ValidationError):
        ResolveCustomerRequest(registration_token="")
    result = ResolveCustomerResult.from_boto(
        {
            "CustomerIdentifier": "c-1",
            "ProductCode": PRODUCT,
            "CustomerAWSAccountId": "123456789012",
            "LicenseArn": "arn:aws:license-manager::123456789012:license:l-1",
            "Metadata": {"AgreementId": "agmt-1"},
            "SomeFutureMember": "ignored",
        }
    )
    assert result.customer_aws_account_id == "123456789012"
    assert result.metadata is not None
    assert result.metadata.agreement_id == "agmt-1"


def test_requests_are_immutable() -> None:
    request = RegisterUsageRequest(product_code=PRODUCT, public_key_version=1)
    with pytest.raises(ValidationError):
        request.nonce = "changed"  # type: ignore[misc]


# -- property: formatting is exact and always in AWS's pattern ------------------------------------

_QUANTITY_RE = re.compile(DECIMAL_QUANTITY_PATTERN)


@given(
    st.decimals(
        min_value=Decimal(0),
        max_value=Decimal("9999999999.999999"),
        places=6,
        allow_nan=False,
        allow_infinity=False,
    ),
    st.integers(min_value=0, max_value=8),
)
def test_every_six_place_quantity_formats_exactly_into_the_pattern(value: Decimal, extra_zeros: int) -> None:
    # Trailing zeros (a larger exponent than needed) must not matter.
    padded = Decimal(f"{value:f}{'0' * extra_zeros}" if "." in f"{value:f}" else f"{value:f}")
    for candidate in (value, padded, value.normalize()):
        text = format_decimal_quantity(candidate)
        assert _QUANTITY_RE.match(text), text
        assert Decimal(text) == value
