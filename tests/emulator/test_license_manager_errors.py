"""Every error botocore models for the five License Manager operations, reached through boto3.

Like test_modelled_errors.py for the Metering Service: the cases are compared with botocore's own
model, so a botocore that adds an error to one of these operations fails here until the emulator
can produce it. Each case provokes its error the way a caller meets it; only rate limiting and
internal errors come from fault injection, and the event log must agree about which is which.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import botocore.session
import pytest
from botocore.exceptions import ClientError

from tests.emulator.conftest import (
    CONTRACT_LICENSE,
    CONTRACT_SKU,
    EXPIRED_SKU,
    FAR_SKU,
    MARKETPLACE_FINGERPRINT,
    NO_KEY_FINGERPRINT,
    NO_KEY_SKU,
    NOT_ENTITLED,
    OTHER_BUYER_LICENSE,
    OTHER_REGION,
    PENDING_SKU,
    ROLE_NO_METER,
    ROLE_NOT_ENTITLED,
    clock_fixed_at,
    code_of,
    license_manager,
)
from tests.emulator.harness import EmulatorProcess

PodCreds = Callable[..., dict[str, str]]
NOW = dt.datetime(2031, 7, 9, 10, 20, tzinfo=dt.UTC)
OPERATIONS = (
    "CheckoutLicense",
    "ExtendLicenseConsumption",
    "CheckInLicense",
    "GetLicense",
    "ListReceivedLicenses",
)
THROTTLE = {"throttle_rate": 1.0}
OUTAGE = {"error_rate": 1.0}


@dataclass
class Env:
    emulator: EmulatorProcess
    pod_creds: PodCreds

    def client(self, role: str | None = None, region: str | None = None) -> Any:
        creds = self.pod_creds(**({"role": role} if role else {}))
        return license_manager(self.emulator, creds, **({"region": region} if region else {}))

    def token(self, role: str | None = None, **changes: Any) -> str:
        """A live consumption token, checked out by a fresh pod of ``role``."""
        result = self.client(role).checkout_license(**checkout_params(**changes))
        return str(result["LicenseConsumptionToken"])


def checkout_params(**changes: Any) -> dict[str, Any]:
    return {
        "ProductSKU": CONTRACT_SKU,
        "CheckoutType": "PROVISIONAL",
        "KeyFingerprint": MARKETPLACE_FINGERPRINT,
        "Entitlements": [{"Name": "premium", "Unit": "None"}],
        "ClientToken": uuid.uuid4().hex,
        **changes,
    }


Provoke = Callable[[Env], Any]


@dataclass(frozen=True)
class Case:
    provoke: Provoke
    fault: dict[str, Any] | None = None


def checkout(role: str | None = None, region: str | None = None, **changes: Any) -> Provoke:
    return lambda env: env.client(role, region).checkout_license(**checkout_params(**changes))


def extend(token: Callable[[Env], str], role: str | None = None) -> Provoke:
    return lambda env: env.client(role).extend_license_consumption(LicenseConsumptionToken=token(env))


def check_in(token: Callable[[Env], str], role: str | None = None) -> Provoke:
    return lambda env: env.client(role).check_in_license(LicenseConsumptionToken=token(env))


def get(arn: str, role: str | None = None, **changes: Any) -> Provoke:
    return lambda env: env.client(role).get_license(LicenseArn=arn, **changes)


def listing(role: str | None = None, **params: Any) -> Provoke:
    return lambda env: env.client(role).list_received_licenses(**params)


def live(env: Env) -> str:
    return env.token()


def theirs(env: Env) -> str:
    """A token of another buyer account's checkout."""
    return env.token(ROLE_NOT_ENTITLED)


def perpetual(env: Env) -> str:
    return env.token(
        CheckoutType="PERPETUAL", Entitlements=[{"Name": "pinned", "Unit": "Count", "Value": "1"}]
    )


def unknown(_: Env) -> str:
    return uuid.uuid4().hex


def malformed(_: Env) -> str:
    return "not-a-token"


def empty(_: Env) -> str:
    return ""


CASES: dict[str, dict[str, Case]] = {
    "CheckoutLicense": {
        "AccessDeniedException": Case(checkout(ROLE_NO_METER)),
        "AuthorizationException": Case(checkout(ProductSKU=PENDING_SKU)),
        "InvalidParameterValueException": Case(checkout(KeyFingerprint="not-a-fingerprint")),
        "NoEntitlementsAllowedException": Case(checkout(ProductSKU=EXPIRED_SKU)),
        "RateLimitExceededException": Case(checkout(), fault=THROTTLE),
        "RedirectException": Case(checkout(ProductSKU=FAR_SKU)),
        "ResourceNotFoundException": Case(
            checkout(KeyFingerprint="aws:123456789012:Nobody:issuer-fingerprint")
        ),
        "ServerInternalException": Case(checkout(), fault=OUTAGE),
        "UnsupportedDigitalSignatureMethodException": Case(
            checkout(ProductSKU=NO_KEY_SKU, KeyFingerprint=NO_KEY_FINGERPRINT)
        ),
        # The model's pattern \S+: a client token with a space passes boto3, not the service.
        "ValidationException": Case(checkout(ClientToken="two words")),
    },
    "ExtendLicenseConsumption": {
        "AccessDeniedException": Case(extend(live, ROLE_NO_METER)),
        "AuthorizationException": Case(extend(theirs)),
        "InvalidParameterValueException": Case(extend(malformed)),
        "RateLimitExceededException": Case(extend(unknown), fault=THROTTLE),
        "ResourceNotFoundException": Case(extend(unknown)),
        "ServerInternalException": Case(extend(unknown), fault=OUTAGE),
        "ValidationException": Case(extend(empty)),
    },
    "CheckInLicense": {
        "AccessDeniedException": Case(check_in(live, ROLE_NO_METER)),
        "AuthorizationException": Case(check_in(theirs)),
        "ConflictException": Case(check_in(perpetual)),
        "InvalidParameterValueException": Case(check_in(malformed)),
        "RateLimitExceededException": Case(check_in(unknown), fault=THROTTLE),
        "ResourceNotFoundException": Case(check_in(unknown)),
        "ServerInternalException": Case(check_in(unknown), fault=OUTAGE),
        "ValidationException": Case(check_in(empty)),
    },
    "GetLicense": {
        "AccessDeniedException": Case(get(CONTRACT_LICENSE, ROLE_NO_METER)),
        "AuthorizationException": Case(get(OTHER_BUYER_LICENSE)),
        "InvalidParameterValueException": Case(get(CONTRACT_LICENSE.replace("l-0a1b", "l-9999"))),
        "RateLimitExceededException": Case(get(CONTRACT_LICENSE), fault=THROTTLE),
        "ServerInternalException": Case(get(CONTRACT_LICENSE), fault=OUTAGE),
        "ValidationException": Case(get("not-an-arn")),
    },
    "ListReceivedLicenses": {
        "AccessDeniedException": Case(listing(ROLE_NO_METER)),
        # Licenses another account received are not the caller's to list.
        "AuthorizationException": Case(listing(Filters=[{"Name": "Beneficiary", "Values": [NOT_ENTITLED]}])),
        "InvalidParameterValueException": Case(listing(Filters=[{"Name": "Color", "Values": ["red"]}])),
        "RateLimitExceededException": Case(listing(), fault=THROTTLE),
        "ResourceLimitExceededException": Case(listing(LicenseArns=[CONTRACT_LICENSE] * 51)),
        "ServerInternalException": Case(listing(), fault=OUTAGE),
        "ValidationException": Case(listing(MaxResults=101)),
    },
}


def modelled_errors(operation: str) -> set[str]:
    model = botocore.session.get_session().get_service_model("license-manager")
    return {shape.error_code or shape.name for shape in model.operation_model(operation).error_shapes}


@pytest.mark.parametrize("operation", OPERATIONS)
def test_the_cases_cover_exactly_the_modelled_errors(operation: str) -> None:
    assert set(CASES[operation]) == modelled_errors(operation)


def test_the_cases_are_the_operations_the_emulator_serves() -> None:
    assert set(CASES) == set(OPERATIONS)


@pytest.fixture(autouse=True)
def fixed_clock(emulator: EmulatorProcess) -> Iterator[None]:
    with clock_fixed_at(emulator, NOW):
        yield


@pytest.mark.parametrize(
    ("operation", "code"), [(operation, code) for operation, cases in CASES.items() for code in cases]
)
def test_modelled_error_reaches_boto3_as_its_own_exception_class(
    emulator: EmulatorProcess, pod_creds: PodCreds, operation: str, code: str
) -> None:
    case = CASES[operation][code]
    env = Env(emulator, pod_creds)
    if case.fault is not None:
        emulator.admin.set_fault(operation, **case.fault)
    with pytest.raises(ClientError) as exc:
        case.provoke(env)
    assert code_of(exc) == code
    assert exc.value.response["Error"]["Code"] == code
    modelled = getattr(license_manager(emulator, pod_creds()).exceptions, code)
    assert isinstance(exc.value, modelled), f"boto3 raised {type(exc.value).__name__}, not {code}"
    request_id = exc.value.response["ResponseMetadata"]["RequestId"]
    [event] = [e for e in emulator.admin.events(operation=operation) if e["requestID"] == request_id]
    assert event["errorCode"] == code
    assert event["injected"] is (case.fault is not None), "only rate limits and outages are injected"


def test_redirect_names_the_license_home_region(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    with pytest.raises(ClientError) as exc:
        checkout(ProductSKU=FAR_SKU)(Env(emulator, pod_creds))
    assert OTHER_REGION in exc.value.response["Error"]["Message"]
    assert exc.value.response["Location"] == f"https://license-manager.{OTHER_REGION}.amazonaws.com"
