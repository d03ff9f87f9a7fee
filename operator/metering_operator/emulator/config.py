"""The emulator's configuration: a YAML file validated with pydantic.

Field names are camelCase in YAML (like the Kubernetes and AWS shapes the file sits next to).
Everything is optional, so an empty file (or no file) is a valid, empty AWS: no products,
no roles, no issuers. No Region is assumed: without ``region`` any request Region is accepted.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from metering_operator.domain.product import LicenseEntitlementUnit

PRODUCT_CODE_RE = re.compile(r"^[-a-zA-Z0-9/=:_.@]{1,255}$")
ROLE_ARN_RE = re.compile(r"^arn:aws[a-zA-Z-]*:iam::(\d{12}):role/[\w+=,.@/-]+$")
ACCOUNT_RE = re.compile(r"^\d{12}$")
# The issuer key fingerprint License Manager callers name (AWS's seller guide gives Marketplace's).
KEY_FINGERPRINT_RE = re.compile(r"^aws:\d{12}:[A-Za-z0-9/_.+=@-]{1,128}:issuer-fingerprint$")
MARKETPLACE_KEY_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
LICENSE_ARN_RE = re.compile(r"^arn:aws[a-zA-Z-]*:license-manager::\d{12}:license[:/]l-[0-9a-zA-Z]{1,64}$")
# botocore's EntitlementUnit / EntitlementDataUnit enum (license-manager 2018-08-01): one list, in the domain.
ENTITLEMENT_UNITS: tuple[str, ...] = get_args(LicenseEntitlementUnit)
METERING_OPERATIONS = ("RegisterUsage", "MeterUsage", "BatchMeterUsage", "ResolveCustomer")
LICENSE_MANAGER_OPERATIONS = (
    "CheckoutLicense",
    "ExtendLicenseConsumption",
    "CheckInLicense",
    "GetLicense",
    "ListReceivedLicenses",
)
OPERATIONS = (
    *METERING_OPERATIONS,
    *LICENSE_MANAGER_OPERATIONS,
    "AssumeRoleWithWebIdentity",
    "GetCallerIdentity",
)
# IAM actions a role or key may call when its config says nothing: every Marketplace Metering and
# License Manager action (a role that forgets one is configured with allowedActions).
DEFAULT_ACTIONS = ("aws-marketplace:*", "license-manager:*")


# The config sections the admin API can add entries to at run time, each with its key member:
# a runtime entry replaces the file's entry with the same key.
OVERLAY_KEYS = {
    "products": "productCode",
    "roles": "arn",
    "issuers": "issuer",
    "staticCredentials": "accessKeyId",
    "registrationTokens": "token",
    "licenses": "licenseArn",
}


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message says where and why."""


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class KeyVersion(_Model):
    version: int = Field(ge=1)
    # Once the emulator's clock passes this instant the version counts as expired:
    # RegisterUsage still signs with it but answers PublicKeyRotationTimestamp.
    expires_at: datetime | None = None

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("expiresAt must carry a time zone (use Z for UTC)")
        return value


class Dimension(_Model):
    name: str = Field(min_length=1, max_length=255)
    price: float = Field(default=0.0, ge=0)


class Customer(_Model):
    """A SaaS customer (BatchMeterUsage / ResolveCustomer)."""

    aws_account_id: str
    customer_identifier: str | None = None
    license_arn: str | None = None

    @field_validator("aws_account_id")
    @classmethod
    def _account(cls, value: str) -> str:
        if not ACCOUNT_RE.match(value):
            raise ValueError("awsAccountId must be 12 digits")
        return value


class Product(_Model):
    product_code: str
    public_key_versions: list[KeyVersion] = Field(default_factory=lambda: [KeyVersion(version=1)])
    # No dimensions = an hourly (RegisterUsage) product; with dimensions = custom metering.
    dimensions: list[Dimension] = Field(default_factory=list)
    entitled_accounts: list[str] = Field(default_factory=list)
    customers: list[Customer] = Field(default_factory=list)
    hourly_price: float = Field(default=0.0, ge=0)
    disabled: bool = False

    @field_validator("product_code")
    @classmethod
    def _code(cls, value: str) -> str:
        if not PRODUCT_CODE_RE.match(value):
            raise ValueError("productCode must match ^[-a-zA-Z0-9/=:_.@]{1,255}$")
        return value

    @field_validator("dimensions", mode="before")
    @classmethod
    def _dims(cls, value: Any) -> Any:
        # Plain names are accepted as shorthand for {name: ...}.
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("public_key_versions", mode="before")
    @classmethod
    def _versions(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"version": v} if isinstance(v, int) else v for v in value]
        return value

    @field_validator("entitled_accounts")
    @classmethod
    def _accounts(cls, value: list[str]) -> list[str]:
        for account in value:
            if not ACCOUNT_RE.match(account):
                raise ValueError(f"entitled account {account!r} must be 12 digits")
        return value

    def dimension_names(self) -> set[str]:
        return {d.name for d in self.dimensions}

    def key_version(self, version: int) -> KeyVersion | None:
        return next((k for k in self.public_key_versions if k.version == version), None)


class Trust(_Model):
    """One web-identity trust statement, like an IRSA role trust policy."""

    issuer: str
    subjects: list[str] = Field(default_factory=lambda: ["*"])  # fnmatch globs over `sub`


class Role(_Model):
    arn: str
    trust: list[Trust] = Field(default_factory=list)
    max_session_seconds: int = Field(default=3600, ge=900, le=43200)
    # IAM actions the role's policies allow (fnmatch globs); sellers often forget MeterUsage.
    allowed_actions: list[str] = Field(default_factory=lambda: list(DEFAULT_ACTIONS))

    @field_validator("arn")
    @classmethod
    def _arn(cls, value: str) -> str:
        if not ROLE_ARN_RE.match(value):
            raise ValueError("arn must look like arn:aws:iam::123456789012:role/NAME")
        return value

    @property
    def account(self) -> str:
        match = ROLE_ARN_RE.match(self.arn)
        assert match is not None  # validated above
        return match.group(1)


class Issuer(_Model):
    """An OIDC issuer whose tokens STS accepts; keys from a JWKS URL or file."""

    issuer: str
    jwks_url: str | None = None
    jwks_file: Path | None = None
    ca_file: Path | None = None  # for an HTTPS jwksUrl served with a private CA (kube-apiserver)
    # kube-apiserver serves its JWKS to authenticated callers only unless anonymous discovery is bound.
    bearer_token_file: Path | None = None
    # ...or authenticate with a client certificate (the local cluster's admin certificate).
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    insecure_skip_verify: bool = False
    # The OIDC provider's client IDs: a token's `aud` must contain one of them.
    audiences: list[str] = Field(default_factory=lambda: ["sts.amazonaws.com"])

    @model_validator(mode="after")
    def _one_source(self) -> Issuer:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("exactly one of jwksUrl or jwksFile is required")
        if self.client_key_file is not None and self.client_cert_file is None:
            raise ValueError("clientKeyFile needs clientCertFile")
        return self


class StaticCredentials(_Model):
    """Long-term keys (an IAM user): accepted for MeterUsage/BatchMeterUsage, never for RegisterUsage."""

    access_key_id: str = Field(min_length=16, max_length=128)
    secret_access_key: str = Field(min_length=1)
    arn: str = "arn:aws:iam::000000000000:user/static"
    allowed_actions: list[str] = Field(default_factory=lambda: list(DEFAULT_ACTIONS))

    @property
    def account(self) -> str:
        parts = self.arn.split(":")
        return parts[4] if len(parts) > 4 else ""


class RegistrationToken(_Model):
    token: str = Field(min_length=1)
    product_code: str
    customer_aws_account_id: str = Field(alias="customerAWSAccountId")
    customer_identifier: str | None = None
    license_arn: str | None = None
    expires_at: datetime | None = None


class LicenseIssuer(_Model):
    """Who issued (and signs) a License Manager license: AWS Marketplace for Marketplace contracts."""

    name: str = Field(default="AWS/Marketplace", min_length=1)
    key_fingerprint: str = Field(default=MARKETPLACE_KEY_FINGERPRINT)
    # JWT_PS384 (the one DigitalSignatureMethod License Manager's model names) signs SignedTokens;
    # None makes every checkout answer UnsupportedDigitalSignatureMethodException (an issuer whose
    # KMS key cannot sign the way the caller needs).
    signature_method: Literal["JWT_PS384", "None"] = "JWT_PS384"

    @field_validator("key_fingerprint")
    @classmethod
    def _fingerprint(cls, value: str) -> str:
        if not KEY_FINGERPRINT_RE.match(value):
            raise ValueError(
                "keyFingerprint must look like aws:<12-digit account>:<issuer>:issuer-fingerprint"
            )
        return value


class LicenseEntitlement(_Model):
    """One entitlement of a license: a counted quantity (maxCount, e.g. floating seats) or a feature."""

    name: str = Field(min_length=1, max_length=255)
    unit: str = "Count"
    # How many units may be checked out at once (floating seats); None = unlimited / a feature flag.
    max_count: int | None = Field(default=None, ge=0)
    # Checkouts beyond maxCount are allowed (and shown as overage in the billing view).
    overage: bool = False
    allow_check_in: bool = True
    # The entitlement's own value, for entitlements that carry one (e.g. a tier name).
    value: str | None = None
    price_per_unit: float = Field(default=0.0, ge=0)

    @field_validator("unit")
    @classmethod
    def _unit(cls, value: str) -> str:
        if value not in ENTITLEMENT_UNITS:
            raise ValueError(f"unit must be one of {', '.join(ENTITLEMENT_UNITS)}")
        return value


class License(_Model):
    """A License Manager license granted to one buyer account (a Marketplace contract)."""

    license_arn: str
    product_sku: str = Field(alias="productSKU", min_length=1, max_length=1024)
    product_name: str = "Emulated product"
    license_name: str = "Emulated contract"
    # The buyer account the license is granted to; only its callers can check it out.
    buyer_account: str
    issuer: LicenseIssuer = Field(default_factory=LicenseIssuer)
    # Where the license lives: calls signed for another Region get RedirectException naming it.
    # Unset: the config's region (or any Region when that is unset too).
    home_region: str | None = None
    status: Literal[
        "AVAILABLE", "PENDING_AVAILABLE", "DEACTIVATED", "SUSPENDED", "EXPIRED", "PENDING_DELETE", "DELETED"
    ] = "AVAILABLE"
    # The buyer's grant: anything but ACTIVE answers AuthorizationException (not yet accepted...).
    received_status: Literal[
        "PENDING_WORKFLOW",
        "PENDING_ACCEPT",
        "REJECTED",
        "ACTIVE",
        "FAILED_WORKFLOW",
        "DELETED",
        "DISABLED",
        "WORKFLOW_COMPLETED",
    ] = "ACTIVE"
    valid_from: datetime = Field(default=datetime(2000, 1, 1, tzinfo=UTC))
    valid_until: datetime | None = None
    # How long a PROVISIONAL checkout holds its seats unless extended or checked in (AWS: 60 minutes).
    provisional_ttl_minutes: int = Field(default=60, ge=1, le=24 * 60)
    entitlements: list[LicenseEntitlement] = Field(default_factory=list)

    @field_validator("license_arn")
    @classmethod
    def _arn(cls, value: str) -> str:
        if not LICENSE_ARN_RE.match(value):
            raise ValueError("licenseArn must look like arn:aws:license-manager::<account>:license:l-<id>")
        return value

    @field_validator("buyer_account")
    @classmethod
    def _buyer(cls, value: str) -> str:
        if not ACCOUNT_RE.match(value):
            raise ValueError("buyerAccount must be 12 digits")
        return value

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("validity times must carry a time zone (use Z for UTC)")
        return value

    @model_validator(mode="after")
    def _unique_entitlements(self) -> License:
        names = [e.name for e in self.entitlements]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate entitlement names: {', '.join(dupes)}")
        return self

    def entitlement(self, name: str) -> LicenseEntitlement | None:
        return next((e for e in self.entitlements if e.name == name), None)


class Fault(_Model):
    throttle_rate: float = Field(default=0.0, ge=0, le=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    latency_ms: int = Field(default=0, ge=0, le=600_000)
    # Delay the *answer* after the operation was processed and recorded: a client that gives up
    # before it arrives has an outcome it cannot know (a "lost answer").
    answer_latency_ms: int = Field(default=0, ge=0, le=600_000)
    # BatchMeterUsage only: each record lands in UnprocessedRecords with this probability.
    unprocessed_rate: float = Field(default=0.0, ge=0, le=1)
    # Every call of the operation answers this error code (any modelled one, e.g. DisabledApiException).
    fail_with: str | None = None
    # Every call fails with an internal error (an outage); fail_with wins when both are set.
    fail_all: bool = False
    # Metering operations only: the fault hits only calls for these product codes (empty: all), so
    # one product can be throttled while another is healthy.
    product_codes: list[str] = Field(default_factory=list)


class Limits(_Model):
    """Bounds that keep one emulator process within a small container's memory and descriptors."""

    # A request's headers and body must arrive within this many seconds; a half-sent request
    # is then closed (also the idle keep-alive timeout between requests).
    request_timeout_seconds: float = Field(default=15.0, gt=0, le=3600)
    # The event log keeps at most this many calls, and none older than maxEventAgeSeconds
    # (wall clock): oldest dropped first.
    max_events: int = Field(default=10_000, ge=1, le=10_000_000)
    max_event_age_seconds: float = Field(default=7 * 86400.0, gt=0)


class EmulatorConfig(_Model):
    region: str | None = None
    limits: Limits = Field(default_factory=Limits)
    products: list[Product] = Field(default_factory=list)
    roles: list[Role] = Field(default_factory=list)
    issuers: list[Issuer] = Field(default_factory=list)
    static_credentials: list[StaticCredentials] = Field(default_factory=list)
    registration_tokens: list[RegistrationToken] = Field(default_factory=list)
    licenses: list[License] = Field(default_factory=list)
    faults: dict[str, Fault] = Field(default_factory=dict)

    @field_validator("faults")
    @classmethod
    def _fault_ops(cls, value: dict[str, Fault]) -> dict[str, Fault]:
        for op in value:
            if op != "*" and op not in OPERATIONS:
                raise ValueError(f"unknown operation {op!r} in faults (known: {', '.join(OPERATIONS)}, *)")
        return value

    @model_validator(mode="after")
    def _unique(self) -> EmulatorConfig:
        for what, keys in (
            ("productCode", [p.product_code for p in self.products]),
            ("role arn", [r.arn for r in self.roles]),
            ("issuer", [i.issuer for i in self.issuers]),
            ("licenseArn", [lic.license_arn for lic in self.licenses]),
        ):
            dupes = {k for k in keys if keys.count(k) > 1}
            if dupes:
                raise ValueError(f"duplicate {what}: {', '.join(sorted(dupes))}")
        return self

    def product(self, code: str) -> Product | None:
        return next((p for p in self.products if p.product_code == code), None)

    def role(self, arn: str) -> Role | None:
        return next((r for r in self.roles if r.arn == arn), None)

    def issuer(self, iss: str) -> Issuer | None:
        return next((i for i in self.issuers if i.issuer == iss), None)

    def license(self, arn: str) -> License | None:
        return next((lic for lic in self.licenses if lic.license_arn == arn), None)

    def merged(self, overlay: dict[str, list[dict[str, Any]]]) -> EmulatorConfig:
        """This config with runtime additions (admin API) replacing entries of the same key."""
        data = self.model_dump(by_alias=True, mode="json")
        for section, key in OVERLAY_KEYS.items():
            for entry in overlay.get(section, []):
                data[section] = [e for e in data[section] if e.get(key) != entry.get(key)] + [entry]
        return EmulatorConfig.model_validate(data)


def parse_config(data: Any, source: str = "config") -> EmulatorConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return EmulatorConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: invalid emulator configuration:"]
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: Path | None) -> EmulatorConfig:
    if path is None:
        return EmulatorConfig()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
