"""MeterUsage through boto3: hourly records per pod and dimension, and every modelled error."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, ReadTimeoutError

from tests.emulator.conftest import (
    BUYER,
    CUSTOM,
    HOURLY,
    REGION,
    ROLE_NO_METER,
    ROLE_NOT_ENTITLED,
    clock_fixed_at,
    code_of,
    metering,
    static_creds,
)
from tests.emulator.harness import EmulatorProcess

PodCreds = Callable[..., dict[str, str]]
# A fixed emulator time in the middle of an hour, so "an hour ago" is a closed, distinct hour.
NOW = dt.datetime(2031, 3, 14, 15, 30, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def fixed_clock(emulator: EmulatorProcess) -> Iterator[None]:
    with clock_fixed_at(emulator, NOW):
        yield


@pytest.fixture
def client(emulator: EmulatorProcess, pod_creds: PodCreds) -> Any:
    return metering(emulator, pod_creds())


def meter(client: Any, hours_ago: float = 1, dimension: str = "replicas", **kwargs: Any) -> dict[str, Any]:
    if "UsageQuantity" not in kwargs and "UsageQuantityAsDecimal" not in kwargs:
        kwargs["UsageQuantity"] = 3
    result: dict[str, Any] = client.meter_usage(
        ProductCode=kwargs.pop("ProductCode", CUSTOM),
        Timestamp=NOW - dt.timedelta(hours=hours_ago),
        UsageDimension=dimension,
        **kwargs,
    )
    return result


def test_one_record_per_pod_dimension_and_hour(
    emulator: EmulatorProcess, client: Any, pod_creds: PodCreds
) -> None:
    first = meter(client, UsageQuantity=17)["MeteringRecordId"]
    assert meter(client, UsageQuantity=17)["MeteringRecordId"] == first, "identical replay is idempotent"
    # Compared by value: 17 == 17.000000, and the hour is the rounded-down timestamp.
    assert meter(client, hours_ago=0.9, UsageQuantityAsDecimal="17.000000")["MeteringRecordId"] == first
    with pytest.raises(client.exceptions.DuplicateRequestException):
        meter(client, UsageQuantity=18)
    other_dimension = meter(client, dimension="cpu", UsageQuantity=18)["MeteringRecordId"]
    other_hour = meter(client, hours_ago=2, UsageQuantity=18)["MeteringRecordId"]
    other_pod = meter(metering(emulator, pod_creds()), UsageQuantity=18)["MeteringRecordId"]
    assert len({first, other_dimension, other_hour, other_pod}) == 4
    records = {r["meteringRecordId"]: r for r in emulator.admin.meter_records(CUSTOM)}
    assert records[first]["quantity"] == "17"
    assert records[first]["hour"] == "2031-03-14T14:00:00Z"
    assert records[first]["dimension"] == "replicas"
    assert records[other_pod]["podUid"] != records[first]["podUid"]


def test_decimal_quantities(client: Any, emulator: EmulatorProcess) -> None:
    record_id = meter(client, hours_ago=3, UsageQuantityAsDecimal="2.5")["MeteringRecordId"]
    saved = next(r for r in emulator.admin.meter_records(CUSTOM) if r["meteringRecordId"] == record_id)
    assert (saved["quantity"], saved["quantityIsDecimal"]) == ("2.5", True)
    with pytest.raises(ClientError) as exc:
        meter(client, hours_ago=4, UsageQuantity=1, UsageQuantityAsDecimal="1")
    assert code_of(exc) == "ValidationException"
    with pytest.raises(ClientError) as exc:
        meter(client, hours_ago=4, UsageQuantityAsDecimal="1.1234567")
    assert code_of(exc) == "ValidationException"


@pytest.mark.parametrize("hours_ago", [6.01, 30, -0.1])
def test_timestamp_out_of_bounds(client: Any, hours_ago: float) -> None:
    with pytest.raises(client.exceptions.TimestampOutOfBoundsException):
        meter(client, hours_ago=hours_ago)


def test_six_hour_window_moves_with_the_emulator_clock(client: Any, emulator: EmulatorProcess) -> None:
    meter(client, hours_ago=5.9)
    emulator.admin.advance_clock(15 * 60)
    with pytest.raises(client.exceptions.TimestampOutOfBoundsException):
        meter(client, hours_ago=5.9)


def test_unknown_dimension_and_product(client: Any) -> None:
    with pytest.raises(client.exceptions.InvalidUsageDimensionException):
        meter(client, dimension="gpus")
    with pytest.raises(client.exceptions.InvalidProductCodeException):
        meter(client, ProductCode="no-such-product")


def test_wrong_endpoint_region(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    client = metering(emulator, pod_creds(), region="other-region-9")
    with pytest.raises(client.exceptions.InvalidEndpointRegionException):
        meter(client)


def tags(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"Key": k, "Value": v} for k, v in pairs]


def test_usage_allocations(client: Any, emulator: EmulatorProcess) -> None:
    good = [
        {"AllocatedUsageQuantity": 2, "Tags": tags(("team", "a"), ("env", "prod"))},
        {"AllocatedUsageQuantity": 3, "Tags": tags(("team", "b"), ("env", "prod"))},
    ]
    record_id = meter(client, hours_ago=1, UsageQuantity=5, UsageAllocations=good)["MeteringRecordId"]
    saved = next(r for r in emulator.admin.meter_records(CUSTOM) if r["meteringRecordId"] == record_id)
    assert saved["allocations"] == good


def test_allocation_without_tags_is_the_untagged_bucket(client: Any, emulator: EmulatorProcess) -> None:
    allocations = [
        {"AllocatedUsageQuantity": 4, "Tags": tags(("team", "a"))},
        {"AllocatedUsageQuantity": 3},
    ]
    record_id = meter(client, hours_ago=3, UsageQuantity=7, UsageAllocations=allocations)["MeteringRecordId"]
    saved = next(r for r in emulator.admin.meter_records(CUSTOM) if r["meteringRecordId"] == record_id)
    assert saved["allocations"] == allocations


@pytest.mark.parametrize(
    ("quantity", "allocations", "expected"),
    [
        (
            {"UsageQuantity": 5},
            [{"AllocatedUsageQuantity": 4, "Tags": tags(("t", "a"))}],
            "InvalidUsageAllocations",
        ),
        (
            {"UsageQuantity": 5},
            [{"AllocatedUsageQuantityAsDecimal": "5", "Tags": tags(("t", "a"))}],
            "InvalidUsageAllocations",
        ),
        (
            {"UsageQuantity": 4},
            [
                {"AllocatedUsageQuantity": 2, "Tags": tags(("t", "a"))},
                {"AllocatedUsageQuantity": 2, "Tags": tags(("t", "a"))},
            ],
            "InvalidUsageAllocations",
        ),
        (
            {"UsageQuantity": 2501},
            [{"AllocatedUsageQuantity": 1, "Tags": tags(("n", str(i)))} for i in range(2501)],
            "InvalidUsageAllocations",
        ),
        (
            {"UsageQuantity": 1},
            [{"AllocatedUsageQuantity": 1, "Tags": tags(*[(f"k{i}", "v") for i in range(6)])}],
            "InvalidTag",
        ),
        (
            {"UsageQuantity": 1},
            [{"AllocatedUsageQuantity": 1, "Tags": tags(("bad{key}", "v"))}],
            "InvalidTag",
        ),
        ({"UsageQuantity": 1}, [{"AllocatedUsageQuantity": 1, "Tags": tags(("k", "x" * 257))}], "InvalidTag"),
    ],
)
def test_invalid_allocations(
    client: Any, quantity: dict[str, Any], allocations: list[dict[str, Any]], expected: str
) -> None:
    with pytest.raises(ClientError) as exc:
        meter(client, hours_ago=2, UsageAllocations=allocations, **quantity)
    assert code_of(exc) == f"{expected}Exception"


def test_client_token_idempotency(client: Any) -> None:
    token = str(uuid.uuid4())
    first = meter(client, hours_ago=1, UsageQuantity=4, ClientToken=token)["MeteringRecordId"]
    assert meter(client, hours_ago=1, UsageQuantity=4, ClientToken=token)["MeteringRecordId"] == first
    with pytest.raises(client.exceptions.IdempotencyConflictException) as exc:
        meter(client, hours_ago=2, UsageQuantity=4, ClientToken=token)
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 409


def test_dry_run(emulator: EmulatorProcess, client: Any, pod_creds: PodCreds) -> None:
    with pytest.raises(ClientError) as exc:
        meter(client, DryRun=True)
    assert code_of(exc) == "DryRunOperation"
    no_permission = metering(emulator, pod_creds(role=ROLE_NO_METER))
    with pytest.raises(ClientError) as exc:
        meter(no_permission, DryRun=True)
    assert code_of(exc) == "UnauthorizedException"
    with pytest.raises(ClientError) as exc:
        meter(no_permission)
    assert code_of(exc) == "AccessDeniedException"
    assert not [r for r in emulator.admin.meter_records(CUSTOM) if r["timestamp"] is None]


def test_first_meter_usage_checks_entitlement_for_custom_products(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    not_entitled = metering(emulator, pod_creds(role=ROLE_NOT_ENTITLED))
    with pytest.raises(not_entitled.exceptions.CustomerNotEntitledException):
        meter(not_entitled)
    code = f"prod-{uuid.uuid4().hex[:10]}"
    emulator.admin.put_product({"productCode": code, "dimensions": ["users"], "entitledAccounts": [BUYER]})
    running = metering(emulator, pod_creds())
    meter(running, dimension="users", ProductCode=code, hours_ago=2)
    emulator.admin.put_product({"productCode": code, "dimensions": ["users"], "entitledAccounts": []})
    meter(running, dimension="users", ProductCode=code, hours_ago=1)  # the same caller is not re-checked
    with pytest.raises(running.exceptions.CustomerNotEntitledException):
        meter(metering(emulator, pod_creds()), dimension="users", ProductCode=code)


def test_static_credentials_can_meter(emulator: EmulatorProcess) -> None:
    client = metering(emulator, static_creds())
    record_id = meter(client, hours_ago=1)["MeteringRecordId"]
    saved = next(r for r in emulator.admin.meter_records(CUSTOM) if r["meteringRecordId"] == record_id)
    assert saved["callerKey"] == f"principal:arn:aws:iam::{BUYER}:user/seller"


def test_hourly_product_without_dimensions(client: Any) -> None:
    with pytest.raises(client.exceptions.InvalidUsageDimensionException):
        meter(client, ProductCode=HOURLY)


@pytest.mark.parametrize(
    ("fault", "expected"),
    [({"throttle_rate": 1.0}, "ThrottlingException"), ({"error_rate": 1.0}, "InternalServiceErrorException")],
)
def test_injected_faults(
    emulator: EmulatorProcess, client: Any, fault: dict[str, Any], expected: str
) -> None:
    emulator.admin.set_fault("MeterUsage", **fault)
    try:
        with pytest.raises(ClientError) as exc:
            meter(client, hours_ago=5)
    finally:
        emulator.admin.clear_faults()
    assert code_of(exc) == expected
    assert not [r for r in emulator.admin.meter_records(CUSTOM) if r["hour"] == "2031-03-14T10:00:00Z"], (
        "a failed call records nothing"
    )


def test_latency_injection_is_reported_in_the_event_log(emulator: EmulatorProcess, client: Any) -> None:
    emulator.admin.set_fault("MeterUsage", latency_ms=300)
    try:
        meter(client, hours_ago=1, dimension="cpu")
    finally:
        emulator.admin.clear_faults()
    event = emulator.admin.events(operation="MeterUsage")[-1]
    assert event["durationMs"] >= 300


def test_fault_limited_to_product_codes_spares_other_products(emulator: EmulatorProcess, client: Any) -> None:
    """One product throttled, another healthy: what the gate's fairness test needs."""
    emulator.admin.set_fault("MeterUsage", throttle_rate=1.0, product_codes=(CUSTOM,))
    try:
        with pytest.raises(ClientError) as exc:
            meter(client, hours_ago=2, dimension="cpu")
        assert code_of(exc) == "ThrottlingException"
        # HOURLY has no dimensions: its answer is a validation error, not the injected throttling.
        with pytest.raises(client.exceptions.InvalidUsageDimensionException):
            meter(client, ProductCode=HOURLY)
    finally:
        emulator.admin.clear_faults()


def test_answer_latency_loses_the_answer_after_the_record_is_made(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    """A client that gives up before the held-back answer arrives cannot know the outcome, yet
    the record exists; the identical resend is answered with that record (AWS's dedup)."""
    creds = pod_creds()
    impatient = boto3.client(
        "meteringmarketplace",
        endpoint_url=emulator.url,
        region_name=REGION,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=0.5),
        **creds,
    )
    token = uuid.uuid4().hex
    emulator.admin.set_fault("MeterUsage", answer_latency_ms=1500)
    try:
        with pytest.raises(ReadTimeoutError):
            meter(impatient, hours_ago=4, dimension="cpu", UsageQuantity=4, ClientToken=token)
        recorded = [
            r
            for r in emulator.admin.meter_records(CUSTOM)
            if r["hour"] == "2031-03-14T11:00:00Z" and r["dimension"] == "cpu"
        ]
        assert [r["quantity"] for r in recorded] == ["4"], "the record was made before the answer was lost"
    finally:
        emulator.admin.clear_faults()
    again = meter(metering(emulator, creds), hours_ago=4, dimension="cpu", UsageQuantity=4, ClientToken=token)
    assert again["MeteringRecordId"] == recorded[0]["meteringRecordId"]
    assert (
        len(
            [
                r
                for r in emulator.admin.meter_records(CUSTOM)
                if r["hour"] == "2031-03-14T11:00:00Z" and r["dimension"] == "cpu"
            ]
        )
        == 1
    )
