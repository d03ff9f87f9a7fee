"""The ``MeteredProduct`` v1alpha1 API: pydantic models of spec and status, and the names around them.

These models are the single source of truth for the resource: the CRD's OpenAPI schema (with its
descriptions, defaults, enums, patterns and CEL rules) is generated from them by
:mod:`metering_operator.domain.crd`, so a field added here reaches ``kubectl explain`` and the API
server's validation without a second definition to keep in step. Cross-field rules therefore live
twice on purpose: as CEL (``x-kubernetes-validations``, enforced by the API server) and as pydantic
validators (enforced when the operator parses an object), and the unit tests check both agree.

Python attributes are snake_case; the wire format is camelCase. Parse with
:meth:`MeteredProduct.from_kube` and write back with :meth:`MeteredProductSpec.to_kube` /
:meth:`MeteredProductStatus.to_kube`, which give JSON-ready dicts (decimals as exact strings, times as
RFC 3339 UTC).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

# --- names -----------------------------------------------------------------------------------------

GROUP = "marketplace.metering.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "MeteredProduct"
LIST_KIND = "MeteredProductList"
PLURAL = "meteredproducts"
SINGULAR = "meteredproduct"
SHORT_NAMES: tuple[str, ...] = ("mprod",)
CATEGORIES: tuple[str, ...] = ("marketplace",)
CRD_NAME = f"{PLURAL}.{GROUP}"

#: Pod and workload annotation: ``Granted|Denied|Pending|Error`` (workloads: a summary, ``Granted 3/3``).
ANNOTATION_ENTITLEMENT = f"{GROUP}/entitlement"
#: The RegisterUsage signature (JWT) proving the registration.
ANNOTATION_SIGNATURE = f"{GROUP}/signature"
#: When the registration succeeded (RFC 3339 UTC).
ANNOTATION_REGISTERED_AT = f"{GROUP}/registered-at"
#: ``<namespace>/<name>`` of the MeteredProduct a pod was registered for.
ANNOTATION_PRODUCT = f"{GROUP}/product"
#: The scheduling gate that holds a pod until it is registered.
SCHEDULING_GATE = f"{GROUP}/entitlement"
#: The label on every object the operator creates for itself (its records in its own namespace):
#: the `-operator` admission policy lets it delete ConfigMaps carrying this label and no others.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "marketplace-metering-operator"

# --- patterns and limits (shared with the CRD; Go RE2 and Python agree on all of these) -------------

#: RegisterUsage/MeterUsage ``ProductCode`` (botocore ``meteringmarketplace`` model), made non-empty.
PRODUCT_CODE_PATTERN = r"^[-a-zA-Z0-9/=:_.@]+$"
PRODUCT_CODE_MAX_LENGTH = 255
#: Dimension API names as listings use them: letters, digits and ``_ . : -``, starting alphanumeric.
#: (MeterUsage itself accepts any 1..255 characters; this refuses whitespace and typos early.)
DIMENSION_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
DIMENSION_NAME_MAX_LENGTH = 255
#: MeterUsage ``Tag.Key`` / ``Tag.Value`` pattern, verbatim from the botocore model.
TAG_PATTERN = r"^[a-zA-Z0-9+ -=._:\/@]+$"
TAG_KEY_MAX_LENGTH = 100
TAG_VALUE_MAX_LENGTH = 256
MAX_ALLOCATION_TAGS = 5
#: Bounded so CEL rules over the list stay within the API server's cost budget.
MAX_DIMENSIONS = 32
#: A Kubernetes label key (optional DNS-subdomain prefix, then a name of up to 63 characters).
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
LABEL_KEY_MAX_LENGTH = 317
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_VALUE_MAX_LENGTH = 63
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
CONFIGMAP_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
PEM_PATTERN = r"^\s*-----BEGIN [A-Z ]+-----"
PEM_MAX_LENGTH = 16384
#: Exact non-negative decimal as written into status (no exponent, no sign).
DECIMAL_PATTERN = r"^(0|[1-9][0-9]*)(\.[0-9]+)?$"
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
#: A License Manager issuer key fingerprint (``aws:<account>:<issuer>:issuer-fingerprint``).
KEY_FINGERPRINT_PATTERN = r"^aws:[0-9]{12}:[A-Za-z0-9/_.+=@-]{1,128}:issuer-fingerprint$"
#: The fingerprint of AWS Marketplace's issuer key, as AWS's seller guide for container contracts gives it.
MARKETPLACE_KEY_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
#: A listing's product SKU as License Manager knows it (Marketplace uses the product id, ``prod-...``).
PRODUCT_SKU_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$"
PRODUCT_SKU_MAX_LENGTH = 255
#: Bounded so CEL rules over the list stay within the API server's cost budget.
MAX_LICENSE_ENTITLEMENTS = 16

# --- scalar types ------------------------------------------------------------------------------------


def _finite_non_negative(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    if value < 0:
        raise ValueError(f"{value} is negative")
    # Adding zero turns -0 into 0, so it never serialises as "-0".
    return value + Decimal(0)


def _decimal_to_str(value: Decimal) -> str:
    # Fixed-point, never an exponent: "1E+3" would not match DECIMAL_PATTERN nor read well.
    return format(value, "f")


#: An exact non-negative decimal; stored in the resource as a string so nothing is lost to floats.
ExactDecimal = Annotated[
    Decimal,
    AfterValidator(_finite_non_negative),
    PlainSerializer(_decimal_to_str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DECIMAL_PATTERN}),
]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


def _whole_hour(value: datetime) -> datetime:
    value = value.astimezone(UTC)
    if (value.minute, value.second, value.microsecond) != (0, 0, 0):
        raise ValueError(f"{value.isoformat()} is not the start of an hour")
    return value


#: A timezone-aware instant, normalised to UTC (serialised as ``2026-01-01T03:00:00Z``).
UtcDateTime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
#: The start of a UTC hour.
Hour = Annotated[AwareDatetime, AfterValidator(_whole_hour)]

# --- enums -------------------------------------------------------------------------------------------


class EntitlementMode(StrEnum):
    """How pods are gated on RegisterUsage."""

    ENFORCE = "Enforce"
    AUDIT = "Audit"
    OFF = "Off"


class EntitlementScope(StrEnum):
    """Who calls RegisterUsage."""

    POD = "Pod"
    CLUSTER = "Cluster"


class EntitlementSource(StrEnum):
    """Which AWS service entitles the product's pods."""

    REGISTER_USAGE = "RegisterUsage"
    LICENSE_MANAGER = "LicenseManager"


class CheckoutType(StrEnum):
    """License Manager CheckoutLicense type (AWS spells them PROVISIONAL and PERPETUAL)."""

    PROVISIONAL = "Provisional"
    PERPETUAL = "Perpetual"


#: License Manager's entitlement units (botocore ``license-manager`` EntitlementDataUnit).
LicenseEntitlementUnit = Literal[
    "Count",
    "None",
    "Seconds",
    "Microseconds",
    "Milliseconds",
    "Bytes",
    "Kilobytes",
    "Megabytes",
    "Gigabytes",
    "Terabytes",
    "Bits",
    "Kilobits",
    "Megabits",
    "Gigabits",
    "Terabits",
    "Percent",
    "Bytes/Second",
    "Kilobytes/Second",
    "Megabytes/Second",
    "Gigabytes/Second",
    "Terabytes/Second",
    "Bits/Second",
    "Kilobits/Second",
    "Megabits/Second",
    "Gigabits/Second",
    "Terabits/Second",
    "Count/Second",
]


class DimensionSource(StrEnum):
    """What a metering dimension measures over the selected pods and their workloads."""

    REPLICAS = "Replicas"
    READY_PODS = "ReadyPods"
    CPU_REQUESTS = "CPURequests"
    MEMORY_REQUESTS_GIB = "MemoryRequestsGiB"


class Aggregation(StrEnum):
    """How an hour's samples become one quantity."""

    AVERAGE = "Average"
    MAXIMUM = "Maximum"
    LAST = "Last"


class Rounding(StrEnum):
    """How an hour's quantity becomes what MeterUsage receives."""

    UP = "Up"
    NEAREST = "Nearest"
    DOWN = "Down"
    DECIMAL = "Decimal"


class TagSource(StrEnum):
    """Where an allocation tag's value comes from, other than a pod label."""

    NAMESPACE = "Namespace"


class FailureAction(StrEnum):
    """What happens once usage could not be reported for ``metering.onFailure.afterHours`` hours."""

    REPORT = "Report"
    HOLD_NEW_PODS = "HoldNewPods"
    EVICT = "Evict"


class LabelSelectorOperator(StrEnum):
    """A label selector requirement's operator."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class ConditionType(StrEnum):
    """The condition types this operator sets on a MeteredProduct."""

    READY = "Ready"
    ENTITLED = "Entitled"
    METERING = "Metering"
    #: The DryRun MeterUsage check at start, on spec change and hourly (docs/metering.md).
    METERING_PERMITTED = "MeteringPermitted"
    #: False once ``metering.onFailure.afterHours`` hours in a row could not be reported.
    METERING_HEALTHY = "MeteringHealthy"


class ConditionStatus(StrEnum):
    """metav1.Condition status."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class EntitlementState(StrEnum):
    """Value of the ``marketplace.metering.dev/entitlement`` pod annotation."""

    GRANTED = "Granted"
    DENIED = "Denied"
    PENDING = "Pending"
    ERROR = "Error"


class LedgerState(StrEnum):
    """Where an hour's MeterUsage record stands (see docs/metering.md)."""

    #: Intent recorded; no call made yet, or every call made was answered with an error.
    PENDING = "Pending"
    #: A call was made (or may have been) and its answer never arrived: AWS may have billed it.
    UNKNOWN = "Unknown"
    SENT = "Sent"
    REJECTED = "Rejected"
    #: Never accepted (every call answered with an error); usage carried into a later hour.
    EXPIRED = "Expired"
    #: The window closed while the outcome was Unknown: not carried, not billed again.
    UNCONFIRMED = "Unconfirmed"


# --- base models -------------------------------------------------------------------------------------


class _Wire(BaseModel):
    """camelCase on the wire, snake_case in Python; either name is accepted when parsing."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )

    def to_kube(self) -> dict[str, Any]:
        """A JSON-ready dict for the API server: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class _SpecModel(_Wire):
    # The API server prunes unknown spec fields; refusing them here catches typos in code and tests.
    model_config = ConfigDict(extra="forbid")


class _StatusModel(_Wire):
    # Status may carry fields written by a newer operator during an upgrade: ignore, never fail.
    model_config = ConfigDict(extra="ignore")


def _cel(rule: str, message: str, *, field_path: str | None = None, reason: str | None = None) -> JsonDict:
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    if reason is not None:
        entry["reason"] = reason
    return entry


def _list_map(*keys: str) -> JsonDict:
    return {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": list(keys)}


def _duplicates(values: list[str]) -> list[str]:
    seen: set[str] = set()
    dups: list[str] = []
    for value in values:
        if value in seen and value not in dups:
            dups.append(value)
        seen.add(value)
    return dups


# --- spec --------------------------------------------------------------------------------------------


class ConfigMapKeyRef(_SpecModel):
    """A key of a ConfigMap in the MeteredProduct's namespace."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN_PATTERN,
        description="Name of the ConfigMap, in the MeteredProduct's namespace.",
    )
    key: str = Field(
        min_length=1,
        max_length=253,
        pattern=CONFIGMAP_KEY_PATTERN,
        description="Key in the ConfigMap whose value is the PEM-encoded RSA public key.",
    )


class PublicKeySource(_SpecModel):
    """Where the RSA public key that verifies RegisterUsage signatures comes from."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.configMapKeyRef) != has(self.pem)",
                    "exactly one of configMapKeyRef or pem must be set",
                )
            ]
        }
    )

    config_map_key_ref: ConfigMapKeyRef | None = Field(
        default=None,
        description="Read the PEM-encoded public key from this ConfigMap key. Exactly one of "
        "configMapKeyRef or pem.",
    )
    pem: str | None = Field(
        default=None,
        min_length=1,
        max_length=PEM_MAX_LENGTH,
        pattern=PEM_PATTERN,
        description="The PEM-encoded RSA public key AWS Marketplace gave the seller for this product "
        "code and key version. Exactly one of configMapKeyRef or pem.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.config_map_key_ref is None) == (self.pem is None):
            raise ValueError("exactly one of configMapKeyRef or pem must be set")
        return self


class LabelSelectorRequirement(_SpecModel):
    """One label requirement, as in a Kubernetes LabelSelector."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.operator in ['In', 'NotIn'] ? (has(self.values) && size(self.values) > 0)"
                    " : (!has(self.values) || size(self.values) == 0)",
                    "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist",
                    field_path=".values",
                )
            ]
        }
    )

    key: str = Field(
        min_length=1,
        max_length=LABEL_KEY_MAX_LENGTH,
        pattern=LABEL_KEY_PATTERN,
        description="The label key the requirement applies to.",
    )
    operator: LabelSelectorOperator = Field(
        description="In, NotIn, Exists or DoesNotExist: how the label's value relates to values.",
    )
    values: list[Annotated[str, Field(max_length=LABEL_VALUE_MAX_LENGTH)]] = Field(
        default_factory=list,
        max_length=64,
        description="Label values. Non-empty for In and NotIn, empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        wants_values = self.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)
        if wants_values != bool(self.values):
            raise ValueError(
                "values must be non-empty for In and NotIn, and empty for Exists and DoesNotExist"
            )
        return self


class LabelSelector(_SpecModel):
    """Selects the product's pods in the MeteredProduct's namespace (a Kubernetes LabelSelector)."""

    match_labels: dict[str, Annotated[str, Field(max_length=LABEL_VALUE_MAX_LENGTH)]] = Field(
        default_factory=dict,
        description="Pods must carry all of these labels with exactly these values.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list,
        max_length=32,
        description="Pods must satisfy all of these label requirements.",
    )


_ONE_AMOUNT_MESSAGE = "exactly one of perPod or perCluster must be set"
_FEATURE_MESSAGE = "an entitlement with unit None is a feature: its perPod or perCluster must be 1"


class LicenseEntitlement(_SpecModel):
    """One License Manager entitlement the product needs, and how much of it per pod or per cluster."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("has(self.perPod) != has(self.perCluster)", _ONE_AMOUNT_MESSAGE),
                _cel(
                    "self.unit != 'None' || (has(self.perPod) && self.perPod == 1)"
                    " || (has(self.perCluster) && self.perCluster == 1)",
                    _FEATURE_MESSAGE,
                ),
            ]
        }
    )

    name: str = Field(
        min_length=1,
        max_length=255,
        description="The entitlement's name in the license (the listing's dimension API name, e.g. seats).",
    )
    unit: LicenseEntitlementUnit = Field(
        default="Count",
        description="The entitlement's unit in the license: Count for seats and other counted "
        "quantities, None for a feature (then perPod or perCluster is 1), or another License Manager "
        "unit (Gigabytes, ...).",
    )
    per_pod: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=2**31 - 1,
        description="Check this much out for each selected pod (with the pod's IRSA identity when "
        "entitlement.scope is Pod, else as the operator) and return it when the pod goes away. "
        "Exactly one of perPod or perCluster.",
    )
    per_cluster: int | None = Field(
        default=None,
        strict=True,
        ge=1,
        le=2**31 - 1,
        description="Check this much out once for the product, as the operator, while any selected "
        "pod runs. Exactly one of perPod or perCluster.",
    )

    @model_validator(mode="after")
    def _one_amount(self) -> Self:
        if (self.per_pod is None) == (self.per_cluster is None):
            raise ValueError(_ONE_AMOUNT_MESSAGE)
        if self.unit == "None" and (self.per_pod or self.per_cluster) != 1:
            raise ValueError(_FEATURE_MESSAGE)
        return self


class LicenseManagerSource(_SpecModel):
    """Entitlement through AWS License Manager (contract pricing): what to check out, from whom."""

    product_sku: str = Field(
        alias="productSKU",
        min_length=1,
        max_length=PRODUCT_SKU_MAX_LENGTH,
        pattern=PRODUCT_SKU_PATTERN,
        description="The listing's product SKU in License Manager (CheckoutLicense ProductSKU; for AWS "
        "Marketplace the product id, e.g. prod-hlrud2qqsxrgq).",
    )
    key_fingerprint: str = Field(
        default=MARKETPLACE_KEY_FINGERPRINT,
        max_length=200,
        pattern=KEY_FINGERPRINT_PATTERN,
        description="The fingerprint of the license issuer's key (CheckoutLicense KeyFingerprint). "
        "AWS Marketplace's, the default, is aws:294406891311:AWS/Marketplace:issuer-fingerprint.",
    )
    checkout_type: CheckoutType = Field(
        default=CheckoutType.PROVISIONAL,
        description="Provisional: a checkout holds its seats for 60 minutes unless extended (while the "
        "pods run) or checked in (when they go away), so a crashed operator leaks no seat for longer. "
        "Perpetual: the checkout draws the quantity down for good (consumption, never returned).",
    )
    entitlements: list[LicenseEntitlement] = Field(
        min_length=1,
        max_length=MAX_LICENSE_ENTITLEMENTS,
        description="The entitlements the product needs, with unique names; a checkout asks for all "
        "of them at once.",
        json_schema_extra=_list_map("name"),
    )
    issuer_public_key: PublicKeySource | None = Field(
        default=None,
        description="The RSA public key of the issuer's signing key, to verify the SignedToken "
        "CheckoutLicense returns (RSASSA-PSS). Unset: the token's claims are checked but not its "
        "signature (AWS does not publish where AWS Marketplace's issuer key is; see "
        "docs/pricing-models.md). The local emulator serves its issuer keys.",
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        dups = _duplicates([entitlement.name for entitlement in self.entitlements])
        if dups:
            raise ValueError(f"duplicate entitlement names: {', '.join(dups)}")
        return self


_SOURCE_MESSAGE = "licenseManager must be set exactly when source is LicenseManager"


class Entitlement(_SpecModel):
    """How pods are checked against the buyer's AWS Marketplace subscription or contract."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "(has(self.source) && self.source == 'LicenseManager') == has(self.licenseManager)",
                    _SOURCE_MESSAGE,
                    field_path=".licenseManager",
                )
            ]
        }
    )

    mode: EntitlementMode = Field(
        default=EntitlementMode.ENFORCE,
        description="Enforce: hold each selected pod behind the scheduling gate until RegisterUsage "
        "succeeds and its signature verifies; a denial is final. Audit: never hold pods, only "
        "register and record the result. Off: no RegisterUsage (metering-only products; then "
        "metering.dimensions must not be empty).",
    )
    scope: EntitlementScope = Field(
        default=EntitlementScope.POD,
        description="Pod: each pod registers with its own IRSA identity (nonce = pod uid), as AWS "
        "bills paid container products per pod. Cluster: register once, as the operator itself.",
    )
    source: EntitlementSource = Field(
        default=EntitlementSource.REGISTER_USAGE,
        description="RegisterUsage: hourly (and metering) listings, entitled per pod by the Metering "
        "Service. LicenseManager: contract listings, entitled by checking licenses out of AWS License "
        "Manager (then licenseManager is required): each pod is released once its checkout's signed "
        "token verified and the operator recorded it; see docs/pricing-models.md.",
    )
    license_manager: LicenseManagerSource | None = Field(
        default=None,
        description="What to check out of License Manager. Exactly when source is LicenseManager.",
    )

    @model_validator(mode="after")
    def _source_matches(self) -> Self:
        if (self.source is EntitlementSource.LICENSE_MANAGER) != (self.license_manager is not None):
            raise ValueError(_SOURCE_MESSAGE)
        return self


class AllocationTag(_SpecModel):
    """One UsageAllocation tag: a fixed key whose value is read from each pod."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.from) != has(self.fromLabel)",
                    "exactly one of from or fromLabel must be set",
                )
            ]
        }
    )

    key: str = Field(
        min_length=1,
        max_length=TAG_KEY_MAX_LENGTH,
        pattern=TAG_PATTERN,
        description="The MeterUsage tag key (1..100 characters of letters, digits and + - = . _ : / @ "
        "and space).",
    )
    from_: TagSource | None = Field(
        default=None,
        alias="from",
        description="Take the tag value from this pod attribute: Namespace (the pod's namespace). "
        "Exactly one of from or fromLabel.",
    )
    from_label: str | None = Field(
        default=None,
        min_length=1,
        max_length=LABEL_KEY_MAX_LENGTH,
        pattern=LABEL_KEY_PATTERN,
        description="Take the tag value from this pod label. Exactly one of from or fromLabel.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.from_ is None) == (self.from_label is None):
            raise ValueError("exactly one of from or fromLabel must be set")
        return self


class Allocations(_SpecModel):
    """Split each hour's quantity into UsageAllocations by tags read from the pods."""

    tags: list[AllocationTag] = Field(
        min_length=1,
        max_length=MAX_ALLOCATION_TAGS,
        description="Up to 5 tags (a MeterUsage limit) with unique keys; pods with the same tag values "
        "share one allocation, and the allocations sum exactly to the hour's quantity.",
        json_schema_extra=_list_map("key"),
    )

    @model_validator(mode="after")
    def _unique_keys(self) -> Self:
        dups = _duplicates([tag.key for tag in self.tags])
        if dups:
            raise ValueError(f"duplicate tag keys: {', '.join(dups)}")
        return self


class Dimension(_SpecModel):
    """One custom pricing dimension of the listing, reported hourly with MeterUsage."""

    name: str = Field(
        min_length=1,
        max_length=DIMENSION_NAME_MAX_LENGTH,
        pattern=DIMENSION_NAME_PATTERN,
        description="The dimension's API name in the AWS Marketplace listing (MeterUsage "
        "UsageDimension): letters, digits and _ . : -, starting with a letter or digit.",
    )
    source: DimensionSource = Field(
        description="What is measured over the selected workloads and pods: Replicas (desired "
        "replicas of the Deployments, StatefulSets and DaemonSets whose pod template the selector "
        "matches, plus selected pods no workload owns), ReadyPods (pods with condition Ready), "
        "CPURequests (sum of container CPU requests, in cores), MemoryRequestsGiB (sum of container "
        "memory requests, in GiB).",
    )
    aggregation: Aggregation = Field(
        default=Aggregation.AVERAGE,
        description="How the hour's samples become one quantity: Average (time-weighted over the "
        "hour), Maximum, or Last (the value at the end of the hour).",
    )
    rounding: Rounding = Field(
        default=Rounding.UP,
        description="How the quantity is sent: Up, Nearest (half up) or Down to a whole number "
        "(UsageQuantity), or Decimal (UsageQuantityAsDecimal, 6 decimal places).",
    )
    allocations: Allocations | None = Field(
        default=None,
        description="Optional UsageAllocations: split the quantity by tags whose values come from each pod.",
    )


#: The most hours ``onFailure.afterHours`` may wait: the ledger keeps 48 hours of history per
#: dimension, and a policy that waits more than a day would hide a day of unbilled usage.
MAX_FAILURE_HOURS = 24
_AFTER_HOURS_MESSAGE = f"onFailure.afterHours must be a whole number of hours from 1 to {MAX_FAILURE_HOURS}"


class OnFailure(_SpecModel):
    """What the operator does when hourly usage keeps failing to reach AWS (docs/metering.md)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.afterHours) || "
                    f"(self.afterHours >= 1 && self.afterHours <= {MAX_FAILURE_HOURS})",
                    _AFTER_HOURS_MESSAGE,
                    field_path=".afterHours",
                )
            ]
        }
    )

    action: FailureAction = Field(
        default=FailureAction.REPORT,
        description="Once afterHours hours in a row could not be reported: Report (the "
        "MeteringHealthy condition False, an Event and the failed-hours metric; pods are not "
        "touched), HoldNewPods (also: new pods of the product stay behind the scheduling gate until "
        "an hour is reported again; running pods keep running), or Evict (also: running pods of the "
        "product are evicted through the Eviction API, which honours PodDisruptionBudgets). "
        "HoldNewPods and Evict need entitlement.mode Enforce.",
    )
    after_hours: int = Field(
        default=3,
        strict=True,
        ge=1,
        le=MAX_FAILURE_HOURS,
        description=f"How many closed hours in a row must have failed to be reported (1 to "
        f"{MAX_FAILURE_HOURS}) before the action is taken. One reported hour resets the count.",
    )


_ON_FAILURE_MODE_MESSAGE = (
    "metering.onFailure.action HoldNewPods and Evict need entitlement.mode Enforce: only Enforce "
    "holds the product's pods behind the scheduling gate"
)


class Metering(_SpecModel):
    """Hourly MeterUsage reporting of custom dimensions."""

    dimensions: list[Dimension] = Field(
        default_factory=list,
        max_length=MAX_DIMENSIONS,
        description="The listing's custom dimensions to meter, with unique names. Empty means no "
        "MeterUsage (hourly-priced products billed through RegisterUsage).",
        json_schema_extra=_list_map("name"),
    )
    dry_run: bool = Field(
        default=False,
        strict=True,
        description="Send MeterUsage with DryRun=true: checks permissions and the whole flow without "
        "billing.",
    )
    sample_interval_seconds: int = Field(
        default=60,
        strict=True,
        ge=5,
        le=3600,
        description="Seconds between samples of each dimension's source for the running hourly aggregate.",
    )
    on_failure: OnFailure = Field(
        default_factory=OnFailure,
        description="What to do after a number of hours in a row in which usage could not be "
        "reported (MeterUsage kept failing, was refused or got no answer).",
        json_schema_extra={"default": {}},
    )

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        dups = _duplicates([dim.name for dim in self.dimensions])
        if dups:
            raise ValueError(f"duplicate dimension names: {', '.join(dups)}")
        return self


PRODUCT_CODE_IMMUTABLE = (
    "productCode is immutable: a MeteredProduct keeps the product code it was created with "
    "(create a new MeteredProduct for another product)"
)

_MODE_OFF = "has(self.entitlement) && has(self.entitlement.mode) && self.entitlement.mode == 'Off'"
_LICENSE_MANAGER = (
    "has(self.entitlement) && has(self.entitlement.source) && self.entitlement.source == 'LicenseManager'"
)
_PUBLIC_KEY_MESSAGE = (
    "publicKey is required unless entitlement.mode is Off or entitlement.source is LicenseManager"
)
_NO_PUBLIC_KEY_MESSAGE = (
    "publicKey verifies RegisterUsage signatures and must not be set when entitlement.source is "
    "LicenseManager (the issuer's key goes in entitlement.licenseManager.issuerPublicKey)"
)
_NO_DIMENSIONS_MESSAGE = (
    "entitlement.mode Off needs at least one metering dimension: otherwise the product is neither "
    "entitled nor metered"
)


_NO_KEY_VERSION_MESSAGE = "publicKeyVersion is required unless entitlement.mode is Off"


class MeteredProductSpec(_SpecModel):
    """A paid AWS Marketplace container product: which pods it is, how they are entitled and metered."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    f"!({_MODE_OFF}) || (has(self.metering) && has(self.metering.dimensions)"
                    " && size(self.metering.dimensions) > 0)",
                    _NO_DIMENSIONS_MESSAGE,
                    field_path=".entitlement.mode",
                ),
                _cel(
                    f"({_MODE_OFF}) || ({_LICENSE_MANAGER}) || has(self.publicKey)",
                    _PUBLIC_KEY_MESSAGE,
                    field_path=".publicKey",
                    reason="FieldValueRequired",
                ),
                _cel(
                    f"!({_LICENSE_MANAGER}) || !has(self.publicKey)",
                    _NO_PUBLIC_KEY_MESSAGE,
                    field_path=".publicKey",
                    reason="FieldValueForbidden",
                ),
                _cel(
                    "!has(self.metering) || !has(self.metering.onFailure) || "
                    "!has(self.metering.onFailure.action) || self.metering.onFailure.action == 'Report' || "
                    "!has(self.entitlement) || !has(self.entitlement.mode) || "
                    "self.entitlement.mode == 'Enforce'",
                    _ON_FAILURE_MODE_MESSAGE,
                    field_path=".metering.onFailure.action",
                ),
                _cel(
                    f"({_MODE_OFF}) || has(self.publicKeyVersion)",
                    _NO_KEY_VERSION_MESSAGE,
                    field_path=".publicKeyVersion",
                    reason="FieldValueRequired",
                ),
            ]
        }
    )

    product_code: str = Field(
        min_length=1,
        max_length=PRODUCT_CODE_MAX_LENGTH,
        pattern=PRODUCT_CODE_PATTERN,
        description="The AWS Marketplace product code of the listing. Must be in the operator's "
        "trusted product codes if the operator has a list. Immutable: set when the MeteredProduct "
        "is created, never changed (a transition rule refuses the update).",
        # A transition rule (oldSelf): only an update can break it, so no single-object validator
        # mirrors it; domain.transitions.immutable_changes does, for two specs.
        json_schema_extra={"x-kubernetes-validations": [_cel("self == oldSelf", PRODUCT_CODE_IMMUTABLE)]},
    )
    # A metering-only product (entitlement.mode Off) never calls RegisterUsage, so has no key.
    public_key_version: int | None = Field(
        default=None,
        strict=True,  # the API server refuses "1" for an integer; so do the models
        ge=1,
        le=2**31 - 1,
        description="Version of the public key AWS issued for this product (RegisterUsage "
        "PublicKeyVersion), at least 1. Required unless entitlement.mode is Off.",
    )
    public_key: PublicKeySource | None = Field(
        default=None,
        description="The RSA public key that verifies RegisterUsage signatures (PS256). Required "
        "unless entitlement.mode is Off or entitlement.source is LicenseManager.",
    )
    selector: LabelSelector = Field(
        description="The product's pods, in the MeteredProduct's namespace. An empty selector "
        "selects every pod in the namespace.",
    )
    entitlement: Entitlement = Field(
        default_factory=Entitlement,
        description="Entitlement checks: RegisterUsage per pod, or License Manager checkouts.",
        json_schema_extra={"default": {}},
    )
    metering: Metering = Field(
        default_factory=Metering,
        description="Hourly metering of custom dimensions with MeterUsage.",
        json_schema_extra={"default": {}},
    )

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        off = self.entitlement.mode is EntitlementMode.OFF
        if off and not self.metering.dimensions:
            raise ValueError(_NO_DIMENSIONS_MESSAGE)
        licensed = self.entitlement.source is EntitlementSource.LICENSE_MANAGER
        if not off and not licensed and self.public_key is None:
            raise ValueError(_PUBLIC_KEY_MESSAGE)
        if licensed and self.public_key is not None:
            raise ValueError(_NO_PUBLIC_KEY_MESSAGE)
        if not off and self.public_key_version is None:
            raise ValueError(_NO_KEY_VERSION_MESSAGE)
        holds = self.metering.on_failure.action is not FailureAction.REPORT
        if holds and self.entitlement.mode is not EntitlementMode.ENFORCE:
            raise ValueError(_ON_FAILURE_MODE_MESSAGE)
        return self

    def dimension(self, name: str) -> Dimension | None:
        """The dimension called ``name``, if the spec has one."""
        return next((dim for dim in self.metering.dimensions if dim.name == name), None)


# --- status ------------------------------------------------------------------------------------------


class Condition(_StatusModel):
    """A metav1.Condition."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Condition type: Ready, Entitled, Metering, MeteringPermitted or MeteringHealthy.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The .metadata.generation the condition was set for.",
    )
    last_transition_time: UtcDateTime = Field(
        description="When the condition last changed status.",
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
        description="A CamelCase, machine-readable reason for the condition's last transition.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="A human-readable explanation of the condition.",
    )


class PodCounts(_StatusModel):
    """How many selected pods are in each entitlement state."""

    registered: int = Field(default=0, ge=0, description="Pods registered with a verified signature.")
    pending: int = Field(default=0, ge=0, description="Pods waiting for registration (gated).")
    denied: int = Field(default=0, ge=0, description="Pods whose registration was refused (stay gated).")


class UsageTag(_StatusModel):
    """A tag with its value, as sent in a UsageAllocation."""

    key: str = Field(max_length=TAG_KEY_MAX_LENGTH, description="Tag key.")
    value: str = Field(max_length=TAG_VALUE_MAX_LENGTH, description="Tag value read from the pods.")


class AllocationAggregate(_StatusModel):
    """The running aggregate of one tag set within an open hour's dimension."""

    tags: list[UsageTag] = Field(
        default_factory=list, description="The tag values this share of the usage carries."
    )
    last_value: ExactDecimal | None = Field(
        default=None, description="This tag set's value at the last sample."
    )
    weighted_sum: ExactDecimal = Field(
        default=Decimal(0), description="Sum over samples of value times seconds held (time integral)."
    )
    maximum: ExactDecimal | None = Field(default=None, description="Largest sampled value this hour.")


class DimensionAggregate(_StatusModel):
    """The running aggregate of one dimension over the open hour."""

    name: str = Field(max_length=DIMENSION_NAME_MAX_LENGTH, description="Dimension name.")
    first_sample_at: UtcDateTime | None = Field(
        default=None, description="When the hour's first sample was taken."
    )
    last_sample_at: UtcDateTime | None = Field(default=None, description="When the last sample was taken.")
    last_value: ExactDecimal | None = Field(default=None, description="The value at the last sample.")
    weighted_sum: ExactDecimal = Field(
        default=Decimal(0),
        description="Sum of value times seconds held, over the covered part of the hour (time integral).",
    )
    covered_seconds: ExactDecimal = Field(
        default=Decimal(0), description="Seconds of the hour the weighted sum covers."
    )
    maximum: ExactDecimal | None = Field(default=None, description="Largest sampled value this hour.")
    samples: int = Field(default=0, ge=0, description="Samples taken this hour.")
    allocations: list[AllocationAggregate] = Field(
        default_factory=list, description="Per tag-set aggregates, when the dimension has allocations."
    )


class OpenHour(_StatusModel):
    """The hour being sampled now; it becomes ledger entries when it closes."""

    start: Hour = Field(description="Start of the open UTC hour.")
    dimensions: list[DimensionAggregate] = Field(
        default_factory=list,
        description="Running aggregate per dimension.",
        json_schema_extra=_list_map("name"),
    )


class LedgerAllocation(_StatusModel):
    """One UsageAllocation of a ledger entry."""

    tags: list[UsageTag] = Field(
        default_factory=list, max_length=MAX_ALLOCATION_TAGS, description="The allocation's tags."
    )
    quantity: ExactDecimal = Field(description="The allocated quantity, exactly as sent.")


class LedgerEntry(_StatusModel):
    """The durable record of one hour of one dimension: intent before MeterUsage, result after it."""

    hour: Hour = Field(description="Start of the UTC hour the usage belongs to (MeterUsage Timestamp).")
    dimension: str = Field(max_length=DIMENSION_NAME_MAX_LENGTH, description="Dimension name.")
    quantity: ExactDecimal = Field(
        description="The quantity to send, an exact decimal string; fixed when the entry is written and "
        "never changed afterwards, so a retry can never bill a different amount."
    )
    allocations: list[LedgerAllocation] = Field(
        default_factory=list, description="UsageAllocations to send; they sum to quantity."
    )
    state: LedgerState = Field(
        default=LedgerState.PENDING,
        description="Pending (intent recorded; no call made, or every call answered with an error), "
        "Unknown (a call may have reached AWS and its answer never arrived; resent identically), Sent "
        "(MeterUsage answered with a record id), Rejected (refused for good), Expired (never accepted "
        "in the window; carried into a later hour), Unconfirmed (the window closed while Unknown; "
        "neither carried nor billed again).",
    )
    decimal: bool | None = Field(
        default=None,
        description="Whether the quantity is sent as UsageQuantityAsDecimal; fixed with the quantity so "
        "every resend is byte-identical.",
    )
    metering_record_id: str | None = Field(
        default=None, description="MeteringRecordId AWS returned for the record."
    )
    client_token: str | None = Field(
        default=None, max_length=64, description="The MeterUsage ClientToken used for every attempt."
    )
    attempts: int = Field(default=0, ge=0, description="MeterUsage calls made for this entry.")
    answered: int = Field(
        default=0,
        ge=0,
        description="Calls AWS answered with an error (they billed nothing); the other attempts may "
        "have reached AWS.",
    )
    last_attempt_at: UtcDateTime | None = Field(default=None, description="When the last call was made.")
    last_error: str | None = Field(default=None, description="The last call's error, if it failed.")
    sent_at: UtcDateTime | None = Field(default=None, description="When the record was confirmed.")
    carried_into: Hour | None = Field(
        default=None, description="For an Expired entry: the hour whose entry took over its quantity."
    )
    carried_from: list[Hour] = Field(
        default_factory=list, description="Expired hours whose quantities this entry includes."
    )


class MeteringStatus(_StatusModel):
    """Metering state: the open hour's aggregate and the ledger of closed hours."""

    open_hour: OpenHour | None = Field(default=None, description="The hour being sampled now.")
    ledger: list[LedgerEntry] = Field(
        default_factory=list,
        description="Closed hours, one entry per hour and dimension.",
        json_schema_extra=_list_map("hour", "dimension"),
    )
    last_sent_hour: Hour | None = Field(
        default=None,
        description="The latest hour with a Sent record and no Pending record (printer column).",
    )


class Registration(_StatusModel):
    """The product's own registration when entitlement.scope is Cluster."""

    state: EntitlementState = Field(description="Granted, Denied, Pending or Error.")
    nonce: str | None = Field(default=None, max_length=255, description="The nonce sent to RegisterUsage.")
    signature: str | None = Field(default=None, description="The verified RegisterUsage signature (JWT).")
    registered_at: UtcDateTime | None = Field(default=None, description="When registration succeeded.")
    attempts: int = Field(default=0, ge=0, description="RegisterUsage calls made.")
    last_error: str | None = Field(default=None, description="The last call's error, if it failed.")


class ObservedSpec(_StatusModel):
    """The spec fields that decide how much the product protects the seller, as last seen."""

    product_code: str = Field(max_length=PRODUCT_CODE_MAX_LENGTH, description="spec.productCode.")
    mode: EntitlementMode = Field(description="spec.entitlement.mode.")
    scope: EntitlementScope = Field(description="spec.entitlement.scope.")
    dry_run: bool = Field(description="spec.metering.dryRun.")
    dimensions: list[Annotated[str, Field(max_length=DIMENSION_NAME_MAX_LENGTH)]] = Field(
        default_factory=list, max_length=MAX_DIMENSIONS, description="spec.metering.dimensions names."
    )
    selector: str | None = Field(
        default=None, description="spec.selector as a label selector string ('' selects every pod)."
    )
    on_failure_action: FailureAction | None = Field(
        default=None, description="spec.metering.onFailure.action (None: observed before it was recorded)."
    )
    on_failure_after_hours: int | None = Field(
        default=None, ge=1, le=MAX_FAILURE_HOURS, description="spec.metering.onFailure.afterHours."
    )


class MeteredProductStatus(_StatusModel):
    """What the operator observed and did; written only by the operator."""

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the operator last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Entitled, Metering, MeteringPermitted and MeteringHealthy conditions.",
        json_schema_extra=_list_map("type"),
    )
    pods: PodCounts = Field(default_factory=PodCounts, description="Selected pods by entitlement state.")
    registration: Registration | None = Field(
        default=None, description="The cluster-wide registration, when entitlement.scope is Cluster."
    )
    metering: MeteringStatus = Field(
        default_factory=MeteringStatus, description="Hourly metering state and ledger."
    )
    observed_spec: ObservedSpec | None = Field(
        default=None,
        description="Product code, entitlement mode and scope, dryRun, dimension names, selector and "
        "onFailure as the "
        "operator last saw them in the spec (as written, before any seller pin): a change to any of "
        "them is reported with an Event, also when it happened while the operator was down.",
    )

    def condition(self, type_: str) -> Condition | None:
        """The condition of this type, if set."""
        return next((c for c in self.conditions if c.type == type_), None)


def _plain(obj: Mapping[str, Any]) -> dict[str, Any]:
    # kopf hands out read-only Mapping views (Body, Spec, Status); pydantic wants plain dicts.
    def convert(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [convert(v) for v in value]
        return value

    result: dict[str, Any] = convert(obj)
    return result


# --- the resource ------------------------------------------------------------------------------------


class ObjectMeta(_StatusModel):
    """The parts of metadata the operator reads (not part of the generated schema)."""

    name: str = ""
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class MeteredProduct(_StatusModel):
    """A MeteredProduct as read from the API server."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: MeteredProductSpec
    status: MeteredProductStatus = Field(default_factory=MeteredProductStatus)

    @classmethod
    def from_kube(cls, obj: Mapping[str, Any]) -> MeteredProduct:
        """Parse an object as the API server (or kopf's body) gives it; a null status counts as empty."""
        data = _plain(obj)
        if data.get("status") is None:
            data.pop("status", None)
        return cls.model_validate(data)

    @property
    def key(self) -> str:
        """``namespace/name``, the value of the ``product`` pod annotation."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
