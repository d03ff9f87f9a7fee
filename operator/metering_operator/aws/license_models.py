"""Typed requests and results for the AWS License Manager operations contract products use.

CheckoutLicense, ExtendLicenseConsumption, CheckInLicense, GetLicense and ListReceivedLicenses,
field by field as botocore's ``license-manager`` 2018-08-01 model has them: each model's aliases
are the wire member names, so ``to_boto()`` gives the boto3 method's keyword arguments and
``from_boto()`` reads its answer. Validation repeats the model's constraints that botocore leaves to
the service (``ClientToken`` length and pattern, the ARN pattern, ``MaxResults``) and the rules a
checkout needs to make sense (at least one entitlement, unique names, a positive value for counted
units), so a bad request fails here naming the field instead of as a ValidationException later.

Times (``IssuedAt``, ``Expiration``, validity) arrive as ISO 8601 strings with a zone; they are
parsed into timezone-aware UTC datetimes (a time without a zone is refused, never guessed).
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from metering_operator.aws.models import LICENSE_ARN_PATTERN, UtcDatetime, _AwsModel, _AwsResult
from metering_operator.domain.product import LicenseEntitlementUnit

#: The issuer key fingerprint of AWS Marketplace, as AWS's seller guide for container contracts gives it.
MARKETPLACE_KEY_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
CLIENT_TOKEN_PATTERN = r"^\S+$"
CLIENT_TOKEN_MAX_LENGTH = 2048

#: botocore's EntitlementDataUnit enum: one list, kept in the domain (the CRD uses it too).
EntitlementUnit = LicenseEntitlementUnit


class CheckoutType(StrEnum):
    """PROVISIONAL holds seats for a while (AWS: 60 minutes unless extended); PERPETUAL draws them down."""

    PROVISIONAL = "PROVISIONAL"
    PERPETUAL = "PERPETUAL"


LicenseArn = Annotated[str, Field(max_length=2048, pattern=LICENSE_ARN_PATTERN)]


class EntitlementData(_AwsModel):
    """An entitlement asked for or granted: a counted quantity (``value``) or, with unit None, a feature."""

    name: str = Field(alias="Name", min_length=1)
    value: str | None = Field(default=None, alias="Value")
    unit: EntitlementUnit = Field(alias="Unit")

    @model_validator(mode="after")
    def _counted_value(self) -> Self:
        if self.unit != "None" and self.value is not None:
            try:
                amount = Decimal(self.value)
            except InvalidOperation:
                raise ValueError(f"entitlement {self.name}: Value {self.value!r} is not a number") from None
            if not amount.is_finite() or amount <= 0:
                raise ValueError(f"entitlement {self.name}: Value must be positive, not {self.value!r}")
        return self

    @property
    def quantity(self) -> Decimal:
        """What a checkout of this entitlement holds (features hold nothing countable)."""
        if self.unit == "None":
            return Decimal(0)
        return Decimal(self.value) if self.value is not None else Decimal(1)


# --------------------------------------------------------------------------------------------
# CheckoutLicense


class CheckoutLicenseRequest(_AwsModel):
    product_sku: str = Field(alias="ProductSKU", min_length=1)
    checkout_type: CheckoutType = Field(alias="CheckoutType")
    key_fingerprint: str = Field(alias="KeyFingerprint", min_length=1)
    entitlements: tuple[EntitlementData, ...] = Field(alias="Entitlements", min_length=1)
    client_token: str = Field(
        alias="ClientToken", min_length=1, max_length=CLIENT_TOKEN_MAX_LENGTH, pattern=CLIENT_TOKEN_PATTERN
    )
    beneficiary: str | None = Field(default=None, alias="Beneficiary", min_length=1)
    node_id: str | None = Field(default=None, alias="NodeId", min_length=1)

    @field_validator("entitlements")
    @classmethod
    def _unique(cls, value: tuple[EntitlementData, ...]) -> tuple[EntitlementData, ...]:
        names = [e.name for e in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"entitlement {dupes[0]} is asked for twice")
        return value

    def to_boto(self) -> dict[str, Any]:
        params = super().to_boto()
        params["CheckoutType"] = self.checkout_type.value
        return params


class CheckoutLicenseResult(_AwsResult):
    checkout_type: CheckoutType | None = Field(default=None, alias="CheckoutType")
    license_consumption_token: str = Field(alias="LicenseConsumptionToken", min_length=1)
    entitlements_allowed: tuple[EntitlementData, ...] = Field(default=(), alias="EntitlementsAllowed")
    signed_token: str | None = Field(default=None, alias="SignedToken")
    node_id: str | None = Field(default=None, alias="NodeId")
    issued_at: UtcDatetime | None = Field(default=None, alias="IssuedAt")
    expiration: UtcDatetime | None = Field(default=None, alias="Expiration")
    license_arn: str | None = Field(default=None, alias="LicenseArn")


# --------------------------------------------------------------------------------------------
# ExtendLicenseConsumption / CheckInLicense


class ExtendLicenseConsumptionRequest(_AwsModel):
    license_consumption_token: str = Field(alias="LicenseConsumptionToken", min_length=1)
    dry_run: bool | None = Field(default=None, alias="DryRun")


class ExtendLicenseConsumptionResult(_AwsResult):
    license_consumption_token: str | None = Field(default=None, alias="LicenseConsumptionToken")
    expiration: UtcDatetime | None = Field(default=None, alias="Expiration")


class CheckInLicenseRequest(_AwsModel):
    license_consumption_token: str = Field(alias="LicenseConsumptionToken", min_length=1)
    beneficiary: str | None = Field(default=None, alias="Beneficiary", min_length=1)


# --------------------------------------------------------------------------------------------
# GetLicense / ListReceivedLicenses


class Issuer(_AwsResult):
    name: str | None = Field(default=None, alias="Name")
    sign_key: str | None = Field(default=None, alias="SignKey")
    key_fingerprint: str | None = Field(default=None, alias="KeyFingerprint")


class Validity(_AwsResult):
    begin: UtcDatetime | None = Field(default=None, alias="Begin")
    end: UtcDatetime | None = Field(default=None, alias="End")


class Entitlement(_AwsResult):
    """An entitlement of a license (GetLicense): name, unit, and for counted ones MaxCount / Overage."""

    name: str = Field(alias="Name")
    unit: str = Field(alias="Unit")
    value: str | None = Field(default=None, alias="Value")
    max_count: int | None = Field(default=None, alias="MaxCount")
    overage: bool | None = Field(default=None, alias="Overage")
    allow_check_in: bool | None = Field(default=None, alias="AllowCheckIn")


class ProvisionalConfiguration(_AwsResult):
    max_time_to_live_in_minutes: int = Field(alias="MaxTimeToLiveInMinutes")


class ConsumptionConfiguration(_AwsResult):
    renew_type: str | None = Field(default=None, alias="RenewType")
    provisional_configuration: ProvisionalConfiguration | None = Field(
        default=None, alias="ProvisionalConfiguration"
    )


class ReceivedMetadata(_AwsResult):
    received_status: str | None = Field(default=None, alias="ReceivedStatus")
    received_status_reason: str | None = Field(default=None, alias="ReceivedStatusReason")
    allowed_operations: tuple[str, ...] = Field(default=(), alias="AllowedOperations")


class License(_AwsResult):
    license_arn: str | None = Field(default=None, alias="LicenseArn")
    license_name: str | None = Field(default=None, alias="LicenseName")
    product_name: str | None = Field(default=None, alias="ProductName")
    product_sku: str | None = Field(default=None, alias="ProductSKU")
    issuer: Issuer | None = Field(default=None, alias="Issuer")
    home_region: str | None = Field(default=None, alias="HomeRegion")
    status: str | None = Field(default=None, alias="Status")
    validity: Validity | None = Field(default=None, alias="Validity")
    beneficiary: str | None = Field(default=None, alias="Beneficiary")
    entitlements: tuple[Entitlement, ...] = Field(default=(), alias="Entitlements")
    consumption_configuration: ConsumptionConfiguration | None = Field(
        default=None, alias="ConsumptionConfiguration"
    )
    version: str | None = Field(default=None, alias="Version")
    received_metadata: ReceivedMetadata | None = Field(default=None, alias="ReceivedMetadata")

    def entitlement(self, name: str) -> Entitlement | None:
        return next((e for e in self.entitlements if e.name == name), None)


class GetLicenseRequest(_AwsModel):
    license_arn: LicenseArn = Field(alias="LicenseArn")
    version: str | None = Field(default=None, alias="Version", min_length=1)


class GetLicenseResult(_AwsResult):
    license: License = Field(alias="License")


ReceivedLicenseFilterName = Literal["ProductSKU", "Status", "Fingerprint", "IssuerName", "Beneficiary"]


class Filter(_AwsModel):
    name: ReceivedLicenseFilterName = Field(alias="Name")
    values: tuple[str, ...] = Field(alias="Values", min_length=1)


class ListReceivedLicensesRequest(_AwsModel):
    license_arns: tuple[LicenseArn, ...] | None = Field(default=None, alias="LicenseArns")
    filters: tuple[Filter, ...] | None = Field(default=None, alias="Filters")
    next_token: str | None = Field(default=None, alias="NextToken", min_length=1)
    max_results: int | None = Field(default=None, alias="MaxResults", ge=1, le=100, strict=True)


class ListReceivedLicensesResult(_AwsResult):
    licenses: tuple[License, ...] = Field(default=(), alias="Licenses")
    next_token: str | None = Field(default=None, alias="NextToken")
