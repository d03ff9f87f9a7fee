"""What an AWS error means for the caller: retry it, accept it as final, or fix the request.

Every error shape botocore models for the four Metering operations, the five License Manager
operations contract products use, and STS ``AssumeRoleWithWebIdentity`` (per-pod IRSA
credentials) has an entry in
:data:`CLASSIFICATION`; a unit test compares the table with botocore's model so a new botocore
that adds an error fails the build instead of falling through to a guess. Unmodelled codes that
real endpoints send (validation, signature, access denied, dry run) have entries in
:data:`COMMON`, and anything else falls back on the HTTP status (5xx retryable, 4xx a caller bug).

Categories:

* ``RETRYABLE`` - transient: throttling, internal errors, 5xx, connection and timeout errors.
  Retry with :mod:`metering_operator.aws.backoff`.
* ``DENIED`` - AWS gave a final answer about this customer, product, platform or Region
  (for example ``CustomerNotEntitledException``). Do not retry; report it. AWS only refuses a
  pod's *first* RegisterUsage, so retrying could turn a denial into a grant.
* ``CALLER_BUG`` - the request or the setup is wrong (validation, duplicate with another quantity,
  idempotency conflict, bad tags/allocations, credentials or IAM/trust configuration). Retrying the
  same request cannot help; fix it.
* ``OUT_OF_WINDOW`` - ``TimestampOutOfBoundsException``: the hour is outside what AWS still
  accepts (6 hours back for MeterUsage, 24 for BatchMeterUsage) or in the future. What the
  metering ledger does with it depends on which side (:func:`meter_usage_disposition`).
* ``GONE`` - License Manager's ``ResourceNotFoundException`` for a license consumption token: the
  checkout expired (its seats returned after the provisional time to live) or was checked in.
  Extending it cannot work; check out again. For a check-in it means the seat is already free.

Orthogonal to the category, :attr:`MeteringError.answered` says whether AWS's answer arrived.
A read timeout or a connection closed after the request was sent has no answer: AWS may have
acted on the request. For RegisterUsage that is just a retry; for MeterUsage it decides whether
the hour may be carried (never when a record may exist). :func:`meter_usage_disposition` folds
both into what the metering ledger does.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
    PartialCredentialsError,
    ProxyConnectionError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)


class ErrorCategory(StrEnum):
    RETRYABLE = "Retryable"
    DENIED = "Denied"
    CALLER_BUG = "CallerBug"
    OUT_OF_WINDOW = "OutOfWindow"
    GONE = "Gone"


REGISTER_USAGE = "RegisterUsage"
METER_USAGE = "MeterUsage"
BATCH_METER_USAGE = "BatchMeterUsage"
RESOLVE_CUSTOMER = "ResolveCustomer"
ASSUME_ROLE_WITH_WEB_IDENTITY = "AssumeRoleWithWebIdentity"

METERING_OPERATIONS: Final = (REGISTER_USAGE, METER_USAGE, BATCH_METER_USAGE, RESOLVE_CUSTOMER)

CHECKOUT_LICENSE = "CheckoutLicense"
EXTEND_LICENSE_CONSUMPTION = "ExtendLicenseConsumption"
CHECK_IN_LICENSE = "CheckInLicense"
GET_LICENSE = "GetLicense"
LIST_RECEIVED_LICENSES = "ListReceivedLicenses"

LICENSE_MANAGER_OPERATIONS: Final = (
    CHECKOUT_LICENSE,
    EXTEND_LICENSE_CONSUMPTION,
    CHECK_IN_LICENSE,
    GET_LICENSE,
    LIST_RECEIVED_LICENSES,
)

# One-letter names keep the tables below readable as tables; module-private on purpose.
_R = ErrorCategory.RETRYABLE
_D = ErrorCategory.DENIED
_B = ErrorCategory.CALLER_BUG
_W = ErrorCategory.OUT_OF_WINDOW
_G = ErrorCategory.GONE

# Every License Manager operation can answer these; what they mean is the same everywhere.
_LICENSE_MANAGER_COMMON: Final[Mapping[str, ErrorCategory]] = {
    "RateLimitExceededException": _R,
    "ServerInternalException": _R,
    "ValidationException": _B,
    "InvalidParameterValueException": _B,
    # IAM (license-manager:* actions) or the buyer's grant not being active: setup, not an answer
    # about the contract, so it is not remembered as a denial.
    "AccessDeniedException": _B,
    "AuthorizationException": _B,
}

# Per operation, the wire code of every error shape botocore models for it (checked by
# tests/unit/test_aws_errors.py).
CLASSIFICATION: Final[Mapping[str, Mapping[str, ErrorCategory]]] = {
    REGISTER_USAGE: {
        "ThrottlingException": _R,
        "InternalServiceErrorException": _R,
        # The final entitlement answers the operator must remember per pod.
        "CustomerNotEntitledException": _D,
        "PlatformNotSupportedException": _D,
        "InvalidProductCodeException": _D,
        "InvalidRegionException": _D,
        "InvalidPublicKeyVersionException": _D,
        "DisabledApiException": _D,
    },
    METER_USAGE: {
        "ThrottlingException": _R,
        "InternalServiceErrorException": _R,
        # For custom-metered products the first MeterUsage is the entitlement check.
        "CustomerNotEntitledException": _D,
        "InvalidProductCodeException": _D,
        "InvalidEndpointRegionException": _D,
        # The listing has no such dimension: only the seller changing the listing fixes that.
        "InvalidUsageDimensionException": _D,
        # Never "fixed" by resending another quantity: that would bill twice or lie.
        "DuplicateRequestException": _B,
        "IdempotencyConflictException": _B,
        "InvalidUsageAllocationsException": _B,
        "InvalidTagException": _B,
        "TimestampOutOfBoundsException": _W,
    },
    BATCH_METER_USAGE: {
        "ThrottlingException": _R,
        "InternalServiceErrorException": _R,
        "InvalidProductCodeException": _D,
        "InvalidUsageDimensionException": _D,
        "InvalidCustomerIdentifierException": _D,
        "InvalidLicenseException": _D,
        "DisabledApiException": _D,
        "InvalidUsageAllocationsException": _B,
        "InvalidTagException": _B,
        # One record outside the window rejects the whole batch.
        "TimestampOutOfBoundsException": _W,
    },
    RESOLVE_CUSTOMER: {
        "ThrottlingException": _R,
        "InternalServiceErrorException": _R,
        # A registration token is single-use and short-lived: a bad one is final for that token.
        "InvalidTokenException": _D,
        "ExpiredTokenException": _D,
        "DisabledApiException": _D,
    },
    CHECKOUT_LICENSE: {
        **_LICENSE_MANAGER_COMMON,
        # The buyer's contract does not cover this: no license, expired, or no seat left. Final
        # for this request; a seat may free up later, which is a new decision, not a retry.
        "NoEntitlementsAllowedException": _D,
        # No license (issuer) by that key fingerprint for this buyer: AWS's answer about the buyer.
        "ResourceNotFoundException": _D,
        # The license lives in another Region: the operator's Region setting must change.
        "RedirectException": _B,
        # The issuer's key cannot sign the token: the seller's listing setup.
        "UnsupportedDigitalSignatureMethodException": _B,
    },
    EXTEND_LICENSE_CONSUMPTION: {**_LICENSE_MANAGER_COMMON, "ResourceNotFoundException": _G},
    CHECK_IN_LICENSE: {
        **_LICENSE_MANAGER_COMMON,
        "ResourceNotFoundException": _G,
        # A PERPETUAL checkout (or an entitlement without check-in) cannot be returned.
        "ConflictException": _B,
    },
    GET_LICENSE: dict(_LICENSE_MANAGER_COMMON),
    LIST_RECEIVED_LICENSES: {**_LICENSE_MANAGER_COMMON, "ResourceLimitExceededException": _B},
    # STS speaks the query protocol: its wire codes are the shapes' ``error.code`` traits
    # ("InvalidIdentityToken"), not the shape names ("InvalidIdentityTokenException").
    ASSUME_ROLE_WITH_WEB_IDENTITY: {
        "IDPCommunicationError": _R,
        # The projected token expired before the exchange: mint a new one and try again.
        "ExpiredTokenException": _R,
        # Issuer not registered, bad signature or audience, trust policy refusing the subject:
        # configuration of the cluster's OIDC provider or the role, not an entitlement answer.
        "InvalidIdentityToken": _B,
        "IDPRejectedClaim": _B,
        "MalformedPolicyDocument": _B,
        "PackedPolicyTooLarge": _B,
        "RegionDisabledException": _D,
    },
}

# Codes any operation can get although the model does not list them.
COMMON: Final[Mapping[str, ErrorCategory]] = {
    "Throttling": _R,
    "ThrottlingException": _R,
    "ThrottledException": _R,
    "RequestThrottled": _R,
    "RequestThrottledException": _R,
    "TooManyRequestsException": _R,
    "ServiceUnavailable": _R,
    "ServiceUnavailableException": _R,
    "InternalFailure": _R,
    "InternalError": _R,
    "InternalServiceErrorException": _R,
    "RequestTimeout": _R,
    "RequestTimeoutException": _R,
    "ValidationException": _B,
    "ValidationError": _B,  # the query-protocol (STS) spelling
    "RequestEntityTooLargeException": _B,
    "SerializationException": _B,
    "UnknownOperationException": _B,
    "InvalidParameterException": _B,
    "MissingParameter": _B,
    "MissingAuthenticationToken": _B,
    "MissingAuthenticationTokenException": _B,
    "IncompleteSignature": _B,
    "IncompleteSignatureException": _B,
    "InvalidSignatureException": _B,
    "SignatureDoesNotMatch": _B,
    "InvalidClientTokenId": _B,
    "UnrecognizedClientException": _B,
    # Temporary credentials expired: refresh them (the IRSA cache does) and retry.
    "ExpiredToken": _R,
    "RequestExpired": _R,
    # Missing IAM permission (sellers often forget aws-marketplace:MeterUsage): setup, not entitlement.
    "AccessDenied": _B,
    "AccessDeniedException": _B,
    "UnauthorizedException": _B,
    "UnauthorizedOperation": _B,
}

# Codes this module assigns to errors raised before or without an HTTP answer.
PARAM_VALIDATION = "ParamValidation"
NO_CREDENTIALS = "NoCredentials"
NO_REGION = "NoRegion"
DRY_RUN_OPERATION = "DryRunOperation"


def classify_code(operation: str, code: str, http_status: int | None = None) -> ErrorCategory:
    """The category of an AWS error code returned by ``operation``."""
    by_operation = CLASSIFICATION.get(operation, {})
    if code in by_operation:
        return by_operation[code]
    if code in COMMON:
        return COMMON[code]
    if http_status is not None and http_status >= 500:
        return _R
    if http_status == 429:
        return _R
    return _B


class MeteringError(Exception):
    """An AWS call failed. ``category`` says what to do; ``code`` is the AWS error code."""

    def __init__(
        self,
        code: str,
        message: str,
        operation: str,
        category: ErrorCategory,
        *,
        http_status: int | None = None,
        request_id: str | None = None,
        answered: bool = True,
    ) -> None:
        super().__init__(f"{operation}: {code}: {message}")
        self.code = code
        self.message = message
        self.operation = operation
        self.category = category
        self.http_status = http_status
        self.request_id = request_id
        #: False when the request may have reached AWS and no answer came back.
        self.answered = answered

    @property
    def retryable(self) -> bool:
        return self.category is ErrorCategory.RETRYABLE

    @property
    def denied(self) -> bool:
        return self.category is ErrorCategory.DENIED

    def __repr__(self) -> str:
        return (
            f"MeteringError(code={self.code!r}, message={self.message!r}, "
            f"operation={self.operation!r}, category={self.category.value!r})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields survive pickling (process pools, multiprocessing tests).
        return (
            _rebuild_error,
            (
                self.code,
                self.message,
                self.operation,
                self.category,
                self.http_status,
                self.request_id,
                self.answered,
            ),
        )


def _rebuild_error(
    code: str,
    message: str,
    operation: str,
    category: ErrorCategory,
    http_status: int | None,
    request_id: str | None,
    answered: bool = True,
) -> MeteringError:
    return MeteringError(
        code, message, operation, category, http_status=http_status, request_id=request_id, answered=answered
    )


def from_exception(operation: str, exc: BaseException) -> MeteringError:
    """Translate whatever boto3 raised for ``operation`` into a :class:`MeteringError`.

    Exceptions that are not boto3's (programming errors in our own code) are not translated:
    ``TypeError`` is raised so they surface as bugs instead of being retried as AWS faults.
    """
    if isinstance(exc, MeteringError):
        return exc
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        metadata = exc.response.get("ResponseMetadata", {})
        code = str(error.get("Code") or "Unknown")
        status = metadata.get("HTTPStatusCode")
        status = int(status) if status is not None else None
        return MeteringError(
            code,
            str(error.get("Message") or ""),
            operation,
            classify_code(operation, code, status),
            http_status=status,
            request_id=metadata.get("RequestId"),
        )
    if isinstance(exc, ParamValidationError):
        return MeteringError(PARAM_VALIDATION, str(exc), operation, _B)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return MeteringError(NO_CREDENTIALS, str(exc), operation, _B)
    if isinstance(exc, NoRegionError):
        return MeteringError(NO_REGION, str(exc), operation, _B)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ProxyConnectionError):
        # No connection was made: the request never left, so this is as good as an answer.
        return MeteringError(type(exc).__name__, str(exc), operation, _R)
    if isinstance(exc, BotoConnectionError | HTTPClientError):
        # Read timeout, connection closed or reset, TLS or stream errors: the request may have
        # reached AWS, and its answer did not reach us.
        return MeteringError(type(exc).__name__, str(exc), operation, _R, answered=False)
    if isinstance(exc, BotoCoreError):
        return MeteringError(type(exc).__name__, str(exc), operation, _B)
    raise TypeError(f"not a boto3 error: {exc!r}") from exc


# -- MeterUsage: what an error means for the metering ledger ----------------------------------------


class MeterUsageDisposition(StrEnum):
    """What the metering ledger does with a MeterUsage error."""

    #: AWS answered; nothing was recorded; the same request may succeed later.
    RETRY = "Retry"
    #: AWS answered; nothing was recorded; resending the same request can never succeed.
    FINAL = "Final"
    #: TimestampOutOfBounds: in AWS's future (retry) or past (settle), judged by the ledger.
    OUT_OF_WINDOW = "OutOfWindow"
    #: No answer: AWS may have recorded the request. Resend the identical request.
    NO_ANSWER = "NoAnswer"


# Caller-side codes that resending the identical request can never fix. Other caller-side
# errors (a missing IAM permission, bad credentials) are fixable by the seller without losing
# hours, so they are retried.
FINAL_METER_USAGE_CALLER_ERRORS: Final = frozenset(
    {
        "DuplicateRequestException",
        "IdempotencyConflictException",
        "InvalidUsageAllocationsException",
        "InvalidTagException",
        "ValidationException",
        "SerializationException",
        PARAM_VALIDATION,
    }
)


def meter_usage_disposition(error: MeteringError) -> MeterUsageDisposition:
    if not error.answered:
        return MeterUsageDisposition.NO_ANSWER
    if error.category is ErrorCategory.OUT_OF_WINDOW:
        return MeterUsageDisposition.OUT_OF_WINDOW
    if error.category is ErrorCategory.DENIED or (
        error.category is ErrorCategory.CALLER_BUG and error.code in FINAL_METER_USAGE_CALLER_ERRORS
    ):
        return MeterUsageDisposition.FINAL
    return MeterUsageDisposition.RETRY
