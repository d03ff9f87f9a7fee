"""Every error botocore models for the four Metering operations, reached through boto3.

The table of cases is compared with botocore's own service model, so a botocore release that adds
an error to one of the operations fails here until the emulator can produce it (and gets a case).
Each case provokes the error the way a real caller meets it (an unknown product, a stale hour, a
reused ClientToken...); only throttling and internal errors, which no request can provoke from
AWS, come from fault injection, and the event log must agree about which is which.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import botocore.session
import pytest

from tests.emulator.conftest import (
    CUSTOM,
    DISABLED,
    HOURLY,
    LICENSE,
    ROLE,
    ROLE_NOT_ENTITLED,
    clock_fixed_at,
    code_of,
    metering,
    static_creds,
)
from tests.emulator.harness import EmulatorProcess

PodCreds = Callable[..., dict[str, str]]
NOW = dt.datetime(2031, 7, 9, 10, 20, tzinfo=dt.UTC)
HOUR_AGO = NOW - dt.timedelta(hours=1)
OTHER_REGION = "other-region-9"
THROTTLE = {"throttle_rate": 1.0}
OUTAGE = {"error_rate": 1.0}


@dataclass(frozen=True)
class Case:
    """One boto3 call that must fail with one modelled error.

    ``caller``: "pod" (IRSA credentials of a fresh pod under ``role``) or "static" (IAM user keys).
    ``before``: calls made first with the same client (e.g. the record a duplicate collides with).
    """

    params: dict[str, Any]
    caller: str = "pod"
    role: str = ROLE
    region: str | None = None
    fault: dict[str, Any] | None = None
    before: tuple[dict[str, Any], ...] = field(default_factory=tuple)


def register(**changes: Any) -> dict[str, Any]:
    return {"ProductCode": HOURLY, "PublicKeyVersion": 1, **changes}


def meter(**changes: Any) -> dict[str, Any]:
    base = {"ProductCode": CUSTOM, "Timestamp": HOUR_AGO, "UsageDimension": "replicas", "UsageQuantity": 3}
    return {**base, **changes}


def batch(product: str | None = CUSTOM, **record_changes: Any) -> dict[str, Any]:
    record = {
        "Timestamp": HOUR_AGO,
        "Dimension": "replicas",
        "Quantity": 3,
        "CustomerIdentifier": "cust-buyer",
    }
    params: dict[str, Any] = {"UsageRecords": [{**record, **record_changes}]}
    if product is not None:
        params["ProductCode"] = product
    return params


def tagged(quantity: int, *tags: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"AllocatedUsageQuantity": quantity, "Tags": [{"Key": k, "Value": v} for k, v in tags]}]


SIX_TAGS = tuple((f"k{i}", "v") for i in range(6))
TOKEN = "conflicting-token"

CASES: dict[str, dict[str, Case]] = {
    "RegisterUsage": {
        "CustomerNotEntitledException": Case(register(), role=ROLE_NOT_ENTITLED),
        "DisabledApiException": Case(register(ProductCode=DISABLED)),
        "InternalServiceErrorException": Case(register(), fault=OUTAGE),
        "InvalidProductCodeException": Case(register(ProductCode="no-such-product")),
        "InvalidPublicKeyVersionException": Case(register(PublicKeyVersion=7)),
        "InvalidRegionException": Case(register(), region=OTHER_REGION),
        "PlatformNotSupportedException": Case(register(), caller="static"),
        "ThrottlingException": Case(register(), fault=THROTTLE),
    },
    "MeterUsage": {
        "CustomerNotEntitledException": Case(meter(), role=ROLE_NOT_ENTITLED),
        "DuplicateRequestException": Case(meter(UsageQuantity=4), before=(meter(),)),
        "IdempotencyConflictException": Case(
            meter(ClientToken=TOKEN, UsageDimension="cpu"), before=(meter(ClientToken=TOKEN),)
        ),
        "InternalServiceErrorException": Case(meter(), fault=OUTAGE),
        "InvalidEndpointRegionException": Case(meter(), region=OTHER_REGION),
        "InvalidProductCodeException": Case(meter(ProductCode="no-such-product")),
        "InvalidTagException": Case(meter(UsageQuantity=1, UsageAllocations=tagged(1, *SIX_TAGS))),
        "InvalidUsageAllocationsException": Case(meter(UsageAllocations=tagged(2, ("team", "a")))),
        "InvalidUsageDimensionException": Case(meter(UsageDimension="gpus")),
        "ThrottlingException": Case(meter(), fault=THROTTLE),
        "TimestampOutOfBoundsException": Case(meter(Timestamp=NOW - dt.timedelta(hours=7))),
    },
    "BatchMeterUsage": {
        "DisabledApiException": Case(batch(DISABLED), caller="static"),
        "InternalServiceErrorException": Case(batch(), caller="static", fault=OUTAGE),
        "InvalidCustomerIdentifierException": Case(batch(CustomerIdentifier="nobody"), caller="static"),
        "InvalidLicenseException": Case(
            batch(None, LicenseArn=LICENSE.replace("0123456789", "9999999999")), caller="static"
        ),
        "InvalidProductCodeException": Case(batch("no-such-product"), caller="static"),
        "InvalidTagException": Case(
            batch(Quantity=1, UsageAllocations=tagged(1, ("bad{key}", "v"))), caller="static"
        ),
        "InvalidUsageAllocationsException": Case(
            batch(UsageAllocations=tagged(1, ("team", "a"))), caller="static"
        ),
        "InvalidUsageDimensionException": Case(batch(Dimension="gpus"), caller="static"),
        "ThrottlingException": Case(batch(), caller="static", fault=THROTTLE),
        "TimestampOutOfBoundsException": Case(batch(Timestamp=NOW - dt.timedelta(hours=25)), caller="static"),
    },
    "ResolveCustomer": {
        "DisabledApiException": Case({"RegistrationToken": "config-token-disabled"}, caller="static"),
        "ExpiredTokenException": Case({"RegistrationToken": "config-token-expired"}, caller="static"),
        "InternalServiceErrorException": Case(
            {"RegistrationToken": "config-token-1"}, caller="static", fault=OUTAGE
        ),
        "InvalidTokenException": Case({"RegistrationToken": "no-such-token"}, caller="static"),
        "ThrottlingException": Case({"RegistrationToken": "config-token-1"}, caller="static", fault=THROTTLE),
    },
}


def modelled_errors(operation: str) -> set[str]:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    return {shape.error_code or shape.name for shape in model.operation_model(operation).error_shapes}


@pytest.mark.parametrize("operation", sorted(CASES))
def test_the_cases_cover_exactly_the_modelled_errors(operation: str) -> None:
    assert set(CASES[operation]) == modelled_errors(operation)


def test_the_cases_cover_every_operation_of_the_service() -> None:
    model = botocore.session.get_session().get_service_model("meteringmarketplace")
    assert set(CASES) == set(model.operation_names)


@pytest.fixture(autouse=True)
def fixed_clock(emulator: EmulatorProcess) -> Iterator[None]:
    with clock_fixed_at(emulator, NOW):
        yield


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


@pytest.mark.parametrize(
    ("operation", "code"), [(operation, code) for operation, cases in CASES.items() for code in cases]
)
def test_modelled_error_reaches_boto3_as_its_own_exception_class(
    emulator: EmulatorProcess, pod_creds: PodCreds, operation: str, code: str
) -> None:
    case = CASES[operation][code]
    creds = (
        static_creds() if case.caller == "static" else pod_creds(role=case.role, pod_uid=str(uuid.uuid4()))
    )
    client = metering(emulator, creds, **({"region": case.region} if case.region else {}))
    call = getattr(client, _snake(operation))
    for earlier in case.before:
        call(**earlier)
    if case.fault is not None:
        emulator.admin.set_fault(operation, **case.fault)
    with pytest.raises(getattr(client.exceptions, code)) as exc:
        call(**case.params)
    assert code_of(exc) == code
    request_id = exc.value.response["ResponseMetadata"]["RequestId"]
    [event] = [e for e in emulator.admin.events(operation=operation) if e["requestID"] == request_id]
    assert event["errorCode"] == code
    assert event["injected"] is (case.fault is not None), "only throttling and outages are injected"
