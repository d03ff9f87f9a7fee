"""Error classification: exhaustive over botocore's model, and right for the codes that matter.

ClientError and the transport exceptions below are botocore's real classes constructed the way
botocore constructs them; nothing is patched.
"""

from __future__ import annotations

import pickle

import botocore.session
import pytest
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    ReadTimeoutError,
)

from metering_operator.aws import errors
from metering_operator.aws.errors import CLASSIFICATION, ErrorCategory, MeteringError, classify_code

_SESSION = botocore.session.get_session()


def modelled_errors(service: str, operation: str) -> set[str]:
    model = _SESSION.get_service_model(service).operation_model(operation)
    # The code on the wire (and in ClientError) is the shape's error trait code when it has one.
    return {shape.error_code or shape.name for shape in model.error_shapes}


OPERATIONS = [
    *[("meteringmarketplace", op) for op in errors.METERING_OPERATIONS],
    *[("license-manager", op) for op in errors.LICENSE_MANAGER_OPERATIONS],
    ("sts", errors.ASSUME_ROLE_WITH_WEB_IDENTITY),
]


@pytest.mark.parametrize(("service", "operation"), OPERATIONS)
def test_every_modelled_error_is_classified_and_nothing_else(service: str, operation: str) -> None:
    modelled = modelled_errors(service, operation)
    assert modelled, f"botocore models no errors for {operation}?"
    assert set(CLASSIFICATION[operation]) == modelled


def test_the_metering_service_has_exactly_the_four_operations_we_wrap() -> None:
    model = _SESSION.get_service_model("meteringmarketplace")
    assert set(model.operation_names) == set(errors.METERING_OPERATIONS)


def client_error(operation: str, code: str, status: int = 400, message: str = "boom") -> ClientError:
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": "req-1"},
    }
    return ClientError(response, operation)


@pytest.mark.parametrize(
    ("operation", "code", "category"),
    [
        ("RegisterUsage", "CustomerNotEntitledException", ErrorCategory.DENIED),
        ("RegisterUsage", "PlatformNotSupportedException", ErrorCategory.DENIED),
        ("RegisterUsage", "InvalidProductCodeException", ErrorCategory.DENIED),
        ("RegisterUsage", "InvalidRegionException", ErrorCategory.DENIED),
        ("RegisterUsage", "InvalidPublicKeyVersionException", ErrorCategory.DENIED),
        ("RegisterUsage", "DisabledApiException", ErrorCategory.DENIED),
        ("RegisterUsage", "ThrottlingException", ErrorCategory.RETRYABLE),
        ("RegisterUsage", "InternalServiceErrorException", ErrorCategory.RETRYABLE),
        ("MeterUsage", "InvalidUsageDimensionException", ErrorCategory.DENIED),
        ("MeterUsage", "DuplicateRequestException", ErrorCategory.CALLER_BUG),
        ("MeterUsage", "IdempotencyConflictException", ErrorCategory.CALLER_BUG),
        ("MeterUsage", "InvalidUsageAllocationsException", ErrorCategory.CALLER_BUG),
        ("MeterUsage", "InvalidTagException", ErrorCategory.CALLER_BUG),
        ("MeterUsage", "TimestampOutOfBoundsException", ErrorCategory.OUT_OF_WINDOW),
        ("BatchMeterUsage", "TimestampOutOfBoundsException", ErrorCategory.OUT_OF_WINDOW),
        ("ResolveCustomer", "ExpiredTokenException", ErrorCategory.DENIED),
        # Same code, other meaning: an expired web-identity token is re-minted and retried.
        ("AssumeRoleWithWebIdentity", "ExpiredTokenException", ErrorCategory.RETRYABLE),
        ("AssumeRoleWithWebIdentity", "InvalidIdentityToken", ErrorCategory.CALLER_BUG),
        ("AssumeRoleWithWebIdentity", "AccessDenied", ErrorCategory.CALLER_BUG),
        # Unmodelled but real answers.
        ("MeterUsage", "ValidationException", ErrorCategory.CALLER_BUG),
        ("MeterUsage", "AccessDeniedException", ErrorCategory.CALLER_BUG),
        ("RegisterUsage", "SerializationException", ErrorCategory.CALLER_BUG),
        ("RegisterUsage", "ExpiredToken", ErrorCategory.RETRYABLE),
        # License Manager: a denial is final, a vanished checkout is gone, throttling is retried.
        ("CheckoutLicense", "NoEntitlementsAllowedException", ErrorCategory.DENIED),
        ("CheckoutLicense", "RateLimitExceededException", ErrorCategory.RETRYABLE),
        ("CheckoutLicense", "ServerInternalException", ErrorCategory.RETRYABLE),
        ("CheckoutLicense", "AuthorizationException", ErrorCategory.CALLER_BUG),
        ("CheckoutLicense", "RedirectException", ErrorCategory.CALLER_BUG),
        ("ExtendLicenseConsumption", "ResourceNotFoundException", ErrorCategory.GONE),
        ("CheckInLicense", "ResourceNotFoundException", ErrorCategory.GONE),
        ("CheckInLicense", "ConflictException", ErrorCategory.CALLER_BUG),
    ],
)
def test_classification(operation: str, code: str, category: ErrorCategory) -> None:
    error = errors.from_exception(operation, client_error(operation, code))
    assert isinstance(error, MeteringError)
    assert (error.code, error.operation, error.category) == (code, operation, category)
    assert error.message == "boom"
    assert error.request_id == "req-1"
    assert error.retryable is (category is ErrorCategory.RETRYABLE)
    assert error.denied is (category is ErrorCategory.DENIED)


def test_unknown_codes_fall_back_on_http_status() -> None:
    assert classify_code("MeterUsage", "SomethingNew", 503) is ErrorCategory.RETRYABLE
    assert classify_code("MeterUsage", "SomethingNew", 500) is ErrorCategory.RETRYABLE
    assert classify_code("MeterUsage", "SomethingNew", 429) is ErrorCategory.RETRYABLE
    assert classify_code("MeterUsage", "SomethingNew", 400) is ErrorCategory.CALLER_BUG
    assert classify_code("MeterUsage", "SomethingNew", None) is ErrorCategory.CALLER_BUG


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
    ],
)
def test_transport_errors_are_retryable(exc: Exception) -> None:
    error = errors.from_exception("RegisterUsage", exc)
    assert error.category is ErrorCategory.RETRYABLE
    assert error.code == type(exc).__name__


def test_client_side_problems_are_caller_bugs() -> None:
    assert errors.from_exception("MeterUsage", ParamValidationError(report="bad")).code == "ParamValidation"
    no_creds = errors.from_exception("MeterUsage", NoCredentialsError())
    assert (no_creds.code, no_creds.category) == ("NoCredentials", ErrorCategory.CALLER_BUG)


def test_our_own_bugs_are_not_disguised_as_aws_errors() -> None:
    with pytest.raises(TypeError, match="not a boto3 error"):
        errors.from_exception("MeterUsage", KeyError("oops"))


def test_metering_error_pickles_and_reads_well() -> None:
    error = errors.from_exception("RegisterUsage", client_error("RegisterUsage", "ThrottlingException", 400))
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.code, copy.operation, copy.category, copy.http_status) == (
        "ThrottlingException",
        "RegisterUsage",
        ErrorCategory.RETRYABLE,
        400,
    )
    assert str(error) == "RegisterUsage: ThrottlingException: boom"
    assert "Retryable" in repr(error)
