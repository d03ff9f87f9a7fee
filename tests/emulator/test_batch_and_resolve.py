"""BatchMeterUsage and ResolveCustomer through boto3 (the seller's SaaS side, static keys)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.emulator.conftest import (
    BUYER,
    CUSTOM,
    DISABLED,
    LICENSE,
    NOT_ENTITLED,
    clock_fixed_at,
    code_of,
    metering,
    static_creds,
)
from tests.emulator.harness import EmulatorProcess

NOW = dt.datetime(2031, 5, 20, 12, 30, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def fixed_clock(emulator: EmulatorProcess) -> Iterator[None]:
    with clock_fixed_at(emulator, NOW):
        yield


@pytest.fixture
def client(emulator: EmulatorProcess) -> Any:
    return metering(emulator, static_creds())


def record(
    hours_ago: float = 1, quantity: int = 5, dimension: str = "replicas", **extra: Any
) -> dict[str, Any]:
    rec: dict[str, Any] = {"Timestamp": NOW - dt.timedelta(hours=hours_ago), "Dimension": dimension}
    if "QuantityAsDecimal" not in extra:
        rec["Quantity"] = quantity
    if "CustomerIdentifier" not in extra and "CustomerAWSAccountId" not in extra:
        rec["CustomerAWSAccountId"] = BUYER
    rec.update(extra)
    return rec


def allocation(quantity: int, tag_value: str) -> list[dict[str, Any]]:
    return [{"AllocatedUsageQuantity": quantity, "Tags": [{"Key": "team", "Value": tag_value}]}]


def statuses(result: dict[str, Any]) -> list[str]:
    return [r["Status"] for r in result["Results"]]


def test_batch_results_per_record(client: Any, emulator: EmulatorProcess) -> None:
    result = client.batch_meter_usage(
        ProductCode=CUSTOM,
        UsageRecords=[
            record(1, 5),
            record(1, 7, CustomerAWSAccountId=NOT_ENTITLED),
            record(2, 1, CustomerIdentifier="cust-buyer"),
            record(3, QuantityAsDecimal="1.25", dimension="cpu"),
        ],
    )
    assert statuses(result) == ["Success", "CustomerNotSubscribed", "Success", "Success"]
    assert result["UnprocessedRecords"] == []
    first_id = result["Results"][0]["MeteringRecordId"]
    assert "MeteringRecordId" not in result["Results"][1]
    assert result["Results"][0]["UsageRecord"]["Dimension"] == "replicas"
    again = client.batch_meter_usage(
        ProductCode=CUSTOM, UsageRecords=[record(1, 5), record(1, 6, dimension="replicas")]
    )
    assert statuses(again) == ["Success", "DuplicateRecord"]
    assert again["Results"][0]["MeteringRecordId"] == first_id, "identical requests are idempotent"
    saved = {r["meteringRecordId"]: r for r in emulator.admin.batch_records(CUSTOM)}
    assert saved[first_id]["quantity"] == "5"
    assert saved[first_id]["customer"] == BUYER


def test_license_arn_identifies_the_product(client: Any) -> None:
    result = client.batch_meter_usage(UsageRecords=[record(4, 2, LicenseArn=LICENSE)])
    assert statuses(result) == ["Success"]
    other = LICENSE.replace("l-0123456789", "l-9999999999")
    with pytest.raises(client.exceptions.InvalidLicenseException):
        client.batch_meter_usage(UsageRecords=[record(4, 2, LicenseArn=other)])
    with pytest.raises(client.exceptions.InvalidLicenseException):
        client.batch_meter_usage(
            ProductCode=CUSTOM,
            UsageRecords=[record(4, 2, LicenseArn=LICENSE, CustomerAWSAccountId=NOT_ENTITLED)],
        )


@pytest.mark.parametrize(
    ("product", "records", "expected"),
    [
        (CUSTOM, [record(1), record(25)], "TimestampOutOfBoundsException"),
        (CUSTOM, [record(-0.5)], "TimestampOutOfBoundsException"),
        (CUSTOM, [record(1, dimension="gpus")], "InvalidUsageDimensionException"),
        (CUSTOM, [record(1, CustomerAWSAccountId=None)], "ValidationException"),
        (
            CUSTOM,
            [record(1, CustomerIdentifier="cust-buyer", CustomerAWSAccountId=BUYER)],
            "ValidationException",
        ),
        ("no-such-product", [record(1)], "InvalidProductCodeException"),
        (DISABLED, [record(1)], "DisabledApiException"),
        (
            CUSTOM,
            [record(1, quantity=3, UsageAllocations=allocation(2, "b"))],
            "InvalidUsageAllocationsException",
        ),
        (CUSTOM, [record(1, quantity=1, UsageAllocations=allocation(1, "b{x}"))], "InvalidTagException"),
        (CUSTOM, [record(1, i) for i in range(26)], "ValidationException"),
    ],
)
def test_batch_errors(client: Any, product: str, records: list[dict[str, Any]], expected: str) -> None:
    records = [{k: v for k, v in r.items() if v is not None} for r in records]
    with pytest.raises(ClientError) as exc:
        client.batch_meter_usage(ProductCode=product, UsageRecords=records)
    assert code_of(exc) == expected


def test_unknown_customer_identifier(client: Any) -> None:
    with pytest.raises(client.exceptions.InvalidCustomerIdentifierException):
        client.batch_meter_usage(
            ProductCode=CUSTOM,
            UsageRecords=[
                {"Timestamp": NOW, "Dimension": "replicas", "Quantity": 1, "CustomerIdentifier": "nobody"}
            ],
        )


def test_month_end_grace(client: Any, emulator: EmulatorProcess) -> None:
    last_of_month = dt.datetime(2031, 5, 31, 23, 0, tzinfo=dt.UTC)
    rec = {"Timestamp": last_of_month, "Dimension": "cpu", "Quantity": 1, "CustomerAWSAccountId": BUYER}
    emulator.admin.set_clock(dt.datetime(2031, 6, 1, 5, 0, tzinfo=dt.UTC))
    assert statuses(client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=[rec])) == ["Success"]
    emulator.admin.set_clock(dt.datetime(2031, 6, 1, 6, 30, tzinfo=dt.UTC))
    with pytest.raises(client.exceptions.TimestampOutOfBoundsException):
        client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=[rec])


def test_injected_faults_and_unprocessed_records(client: Any, emulator: EmulatorProcess) -> None:
    emulator.admin.set_fault("BatchMeterUsage", throttle_rate=1.0)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=[record(5)])
    emulator.admin.set_fault("BatchMeterUsage", error_rate=1.0)
    with pytest.raises(client.exceptions.InternalServiceErrorException):
        client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=[record(5)])
    emulator.admin.set_fault("BatchMeterUsage", unprocessed_rate=1.0)
    result = client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=[record(5), record(6)])
    assert result["Results"] == []
    assert [r["Dimension"] for r in result["UnprocessedRecords"]] == ["replicas", "replicas"]
    emulator.admin.clear_faults()
    assert statuses(
        client.batch_meter_usage(ProductCode=CUSTOM, UsageRecords=result["UnprocessedRecords"])
    ) == [
        "Success",
        "Success",
    ]


# -- ResolveCustomer -------------------------------------------------------------------------


def test_resolve_configured_and_minted_tokens(client: Any, emulator: EmulatorProcess) -> None:
    resolved = client.resolve_customer(RegistrationToken="config-token-1")
    assert resolved["CustomerAWSAccountId"] == BUYER
    assert resolved["CustomerIdentifier"] == "cust-buyer"
    assert resolved["ProductCode"] == CUSTOM
    assert resolved["LicenseArn"] == LICENSE
    token = emulator.admin.mint_registration_token(CUSTOM, NOT_ENTITLED, expires_in_seconds=600)
    minted = client.resolve_customer(RegistrationToken=token)
    assert (minted["CustomerAWSAccountId"], minted["ProductCode"]) == (NOT_ENTITLED, CUSTOM)
    emulator.admin.advance_clock(601)
    with pytest.raises(client.exceptions.ExpiredTokenException):
        client.resolve_customer(RegistrationToken=token)


def test_resolve_errors(client: Any, emulator: EmulatorProcess) -> None:
    with pytest.raises(client.exceptions.InvalidTokenException):
        client.resolve_customer(RegistrationToken="no-such-token")
    with pytest.raises(client.exceptions.ExpiredTokenException):
        client.resolve_customer(RegistrationToken="config-token-expired")
    disabled = emulator.admin.mint_registration_token(DISABLED, BUYER)
    with pytest.raises(client.exceptions.DisabledApiException):
        client.resolve_customer(RegistrationToken=disabled)
    with pytest.raises(client.exceptions.DisabledApiException):
        client.resolve_customer(RegistrationToken="config-token-disabled")
    emulator.admin.set_fault("ResolveCustomer", throttle_rate=1.0)
    with pytest.raises(client.exceptions.ThrottlingException):
        client.resolve_customer(RegistrationToken="config-token-1")
    emulator.admin.set_fault("ResolveCustomer", error_rate=1.0)
    with pytest.raises(client.exceptions.InternalServiceErrorException):
        client.resolve_customer(RegistrationToken="config-token-1")
