"""The four Metering operations' rules: RegisterUsage, MeterUsage, BatchMeterUsage, ResolveCustomer.

Each handler gets the authenticated caller and the already shape-validated JSON body and
returns the response body, or raises ``AwsError``. All time comes from the settable clock.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import jwt

from metering_operator.emulator.config import Product
from metering_operator.emulator.context import EmulatorContext
from metering_operator.emulator.errors import AwsError
from metering_operator.emulator.identity import Caller
from metering_operator.emulator.state import MeterRecord
from metering_operator.emulator.validation import to_epoch

# Constraints that the service reports through its own modelled errors, not ValidationException.
EXEMPT_SHAPES = frozenset({"TagList", "TagKey", "TagValue", "UsageAllocations"})

_TAG_RE = re.compile(r"^[a-zA-Z0-9+ -=._:\/@]+$")
METER_WINDOW = timedelta(hours=6)
BATCH_WINDOW = timedelta(hours=24)
MONTH_END_GRACE = timedelta(hours=6)


def _hour(epoch: float) -> float:
    return float(int(epoch // 3600) * 3600)


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _require_action(caller: Caller, action: str) -> None:
    if not caller.allowed(action):
        raise AwsError(
            "AccessDeniedException",
            f"User: {caller.arn} is not authorized to perform: {action} "
            "because no identity-based policy allows it",
        )


def _product(ctx: EmulatorContext, code: str) -> Product:
    product = ctx.config.product(code)
    if product is None:
        raise AwsError("InvalidProductCodeException", f"Product code {code} is not valid.")
    return product


# -- RegisterUsage ---------------------------------------------------------------------------


def register_usage(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    if caller.kind != "AssumedRole":
        raise AwsError(
            "PlatformNotSupportedException",
            "RegisterUsage can only be called from within an ECS task or an EKS pod "
            "(IAM roles for service accounts).",
        )
    _require_action(caller, "aws-marketplace:RegisterUsage")
    region = ctx.config.region
    if region and caller.region != region:
        raise AwsError(
            "InvalidRegionException",
            f"RegisterUsage must be called in the Region the workload runs in ({region}), "
            f"not {caller.region}.",
        )
    product = _product(ctx, body["ProductCode"])
    if product.disabled:
        raise AwsError("DisabledApiException", f"The API is disabled for product {product.product_code}.")
    version = int(body["PublicKeyVersion"])
    key_version = product.key_version(version)
    if key_version is None:
        known = ", ".join(str(k.version) for k in product.public_key_versions) or "none"
        raise AwsError(
            "InvalidPublicKeyVersionException",
            f"Public key version {version} is invalid for product {product.product_code} "
            f"(configured versions: {known}).",
        )
    now = ctx.clock.timestamp()
    nonce = body.get("Nonce")
    existing = ctx.state.registration(product.product_code, caller.key)
    if existing is None:
        # Only the first call for a pod checks the subscription; later ones never fail on it.
        if caller.account not in product.entitled_accounts:
            raise AwsError(
                "CustomerNotEntitledException",
                f"Customer {caller.account} is not entitled to product {product.product_code}.",
            )
        ctx.state.add_registration(product.product_code, caller.key, now, version, nonce, caller.describe())
    else:
        ctx.state.touch_registration(product.product_code, caller.key, now)
    claims: dict[str, Any] = {
        "productCode": product.product_code,
        "publicKeyVersion": version,
        "iat": int(now),
    }
    if nonce is not None:
        claims["nonce"] = nonce
    signature = jwt.encode(
        claims,
        ctx.keys.private_key(product.product_code, version),
        algorithm="PS256",
        headers={"typ": "JWT"},
    )
    result: dict[str, Any] = {"Signature": signature}
    if key_version.expires_at is not None and key_version.expires_at.timestamp() <= now:
        result["PublicKeyRotationTimestamp"] = key_version.expires_at.timestamp()
    return result


# -- quantities and allocations --------------------------------------------------------------


def _quantity(body: dict[str, Any], int_field: str, dec_field: str) -> tuple[Decimal, bool]:
    has_int = body.get(int_field) is not None
    has_dec = body.get(dec_field) is not None
    if has_int and has_dec:
        raise AwsError("ValidationException", f"Specify either {int_field} or {dec_field}, not both.")
    if has_dec:
        return Decimal(body[dec_field]), True
    # AWS defaults an absent quantity to 0.
    return Decimal(int(body.get(int_field) or 0)), False


def _check_allocations(allocations: list[dict[str, Any]], total: Decimal, decimal: bool) -> None:
    if not 1 <= len(allocations) <= 2500:
        raise AwsError(
            "InvalidUsageAllocationsException", "UsageAllocations must hold between 1 and 2500 entries."
        )
    seen: set[frozenset[tuple[str, str]]] = set()
    allocated = Decimal(0)
    for index, allocation in enumerate(allocations, start=1):
        has_int = allocation.get("AllocatedUsageQuantity") is not None
        has_dec = allocation.get("AllocatedUsageQuantityAsDecimal") is not None
        if (has_dec and not decimal) or (has_int and decimal):
            raise AwsError(
                "InvalidUsageAllocationsException",
                "Allocations must use the same type of quantity (whole number or decimal) "
                "as the usage quantity.",
            )
        if has_dec:
            allocated += Decimal(allocation["AllocatedUsageQuantityAsDecimal"])
        elif has_int:
            allocated += Decimal(int(allocation["AllocatedUsageQuantity"]))
        # An allocation without Tags is the bucket of untagged usage (botocore documents that the
        # member can be left out); a Tags list that is present must hold 1 to 5 tags.
        tags = allocation.get("Tags")
        if tags is None:
            tags = []
        elif not 1 <= len(tags) <= 5:
            raise AwsError("InvalidTagException", f"Allocation {index} must have between 1 and 5 tags.")
        keys: set[str] = set()
        for tag in tags:
            key, value = tag["Key"], tag["Value"]
            if not (1 <= len(key) <= 100 and _TAG_RE.match(key)):
                raise AwsError("InvalidTagException", f"Tag key {key!r} is invalid.")
            if not (1 <= len(value) <= 256 and _TAG_RE.match(value)):
                raise AwsError("InvalidTagException", f"Tag value {value!r} is invalid.")
            if key in keys:
                raise AwsError("InvalidTagException", f"Tag key {key!r} appears twice in allocation {index}.")
            keys.add(key)
        tag_set = frozenset((t["Key"], t["Value"]) for t in tags)
        if tag_set in seen:
            raise AwsError(
                "InvalidUsageAllocationsException", f"Allocation {index} repeats another allocation's tags."
            )
        seen.add(tag_set)
    if allocated != total:
        raise AwsError(
            "InvalidUsageAllocationsException",
            f"The allocated quantities sum to {allocated}, not to the usage quantity {total}.",
        )


def _request_hash(body: dict[str, Any]) -> str:
    without_token = {k: v for k, v in body.items() if k != "ClientToken"}
    return hashlib.sha256(json.dumps(without_token, sort_keys=True, default=str).encode()).hexdigest()


# -- MeterUsage ------------------------------------------------------------------------------


def _answer_for_client_token(
    ctx: EmulatorContext, caller: Caller, token: str, request_hash: str
) -> dict[str, Any] | None:
    """The stored answer for a reused ClientToken, or None for a new one."""
    seen = ctx.state.client_token(caller.account, token)
    if seen is None:
        return None
    if seen["request_hash"] != request_hash:
        raise AwsError(
            "IdempotencyConflictException",
            "The ClientToken was already used with different request parameters.",
        )
    stored: dict[str, Any] = json.loads(seen["response"])
    return stored


def _check_meter_entitlement(ctx: EmulatorContext, caller: Caller, product: Product, now: float) -> None:
    # For custom-metered products the first MeterUsage of a caller is the entitlement check;
    # once it passed, that caller is never refused on it again (like RegisterUsage).
    if not product.dimensions or ctx.state.meter_entitled(product.product_code, caller.key):
        return
    if caller.account not in product.entitled_accounts:
        raise AwsError(
            "CustomerNotEntitledException",
            f"Customer {caller.account} is not entitled to product {product.product_code}.",
        )
    ctx.state.add_meter_entitlement(product.product_code, caller.key, now)


def meter_usage(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    if body.get("DryRun"):
        if caller.allowed("aws-marketplace:MeterUsage"):
            raise AwsError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        raise AwsError(
            "UnauthorizedException", f"{caller.arn} is not authorized to perform aws-marketplace:MeterUsage."
        )
    _require_action(caller, "aws-marketplace:MeterUsage")
    region = ctx.config.region
    if region and caller.region != region:
        raise AwsError(
            "InvalidEndpointRegionException",
            f"The endpoint's Region {caller.region} differs from the Region the workload runs in ({region}).",
        )
    product = _product(ctx, body["ProductCode"])
    quantity, decimal = _quantity(body, "UsageQuantity", "UsageQuantityAsDecimal")
    timestamp = to_epoch(body["Timestamp"], "timestamp")
    now = ctx.clock.timestamp()
    if timestamp > now or now - timestamp > METER_WINDOW.total_seconds():
        raise AwsError(
            "TimestampOutOfBoundsException",
            f"Timestamp {_iso(timestamp)} is outside the accepted window "
            f"(the last 6 hours before {_iso(now)}).",
        )
    dimension = body["UsageDimension"]
    if dimension not in product.dimension_names():
        raise AwsError(
            "InvalidUsageDimensionException",
            f"Dimension {dimension} is not defined for product {product.product_code}.",
        )
    allocations = body.get("UsageAllocations")
    if allocations is not None:
        _check_allocations(allocations, quantity, decimal)
    token = body.get("ClientToken")
    request_hash = _request_hash(body)
    if token is not None:
        answered = _answer_for_client_token(ctx, caller, token, request_hash)
        if answered is not None:
            return answered
    _check_meter_entitlement(ctx, caller, product, now)
    hour = _hour(timestamp)
    existing = ctx.state.meter_record(product.product_code, caller.key, dimension, hour)
    if existing is not None:
        if Decimal(existing.quantity) != quantity:
            raise AwsError(
                "DuplicateRequestException",
                f"A record for dimension {dimension} and hour {_iso(hour)} was already sent with "
                f"quantity {existing.quantity}.",
            )
        response = {"MeteringRecordId": existing.record_id}
    else:
        record = MeterRecord(
            record_id=str(uuid.uuid4()),
            product_code=product.product_code,
            caller_key=caller.key,
            dimension=dimension,
            hour=hour,
            quantity=str(quantity),
            decimal=decimal,
            allocations=allocations,
            timestamp=timestamp,
            created_at=now,
            identity=caller.describe(),
        )
        ctx.state.add_meter_record(record)
        response = {"MeteringRecordId": record.record_id}
    if token is not None:
        ctx.state.add_client_token(caller.account, token, request_hash, response)
    return response


# -- BatchMeterUsage -------------------------------------------------------------------------


def _batch_timestamp_ok(timestamp: float, now: float) -> bool:
    if timestamp > now or now - timestamp >= BATCH_WINDOW.total_seconds():
        return False
    ts = datetime.fromtimestamp(timestamp, UTC)
    current = datetime.fromtimestamp(now, UTC)
    if (ts.year, ts.month) != (current.year, current.month):
        # Last month's usage is accepted only until 06:00 UTC on the 1st.
        month_start = current.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return current < month_start + MONTH_END_GRACE
    return True


def _product_for_license(ctx: EmulatorContext, license_arn: str) -> Product:
    for product in ctx.config.products:
        if any(c.license_arn == license_arn for c in product.customers):
            return product
    raise AwsError("InvalidLicenseException", f"License {license_arn} is not valid.")


@dataclass(frozen=True)
class _PlannedRecord:
    """A usage record that passed the whole-batch checks, resolved to its product and customer."""

    record: dict[str, Any]
    product: Product
    account: str
    license_arn: str  # "" when the record has none (part of the dedup key)
    quantity: Decimal
    decimal: bool
    timestamp: float


def _plan_record(
    ctx: EmulatorContext, index: int, record: dict[str, Any], request_product: Product | None, now: float
) -> _PlannedRecord:
    """Check one record; any failure rejects the whole batch, as AWS does."""
    timestamp = to_epoch(record["Timestamp"], f"usageRecords.{index}.member.timestamp")
    if not _batch_timestamp_ok(timestamp, now):
        raise AwsError(
            "TimestampOutOfBoundsException",
            f"Record {index}: timestamp {_iso(timestamp)} is outside the accepted window.",
        )
    # AWS's model gives CustomerIdentifier a default of "" (min length 0), and SDKs that fill in
    # defaults (unlike boto3) always send it: an empty value means "not given".
    customer_identifier = record.get("CustomerIdentifier") or None
    has_id = customer_identifier is not None
    if has_id == (record.get("CustomerAWSAccountId") is not None):
        raise AwsError(
            "ValidationException",
            f"Record {index}: specify exactly one of CustomerIdentifier or CustomerAWSAccountId.",
        )
    license_arn = record.get("LicenseArn")
    if request_product is not None:
        product = request_product
    elif license_arn is not None:
        product = _product_for_license(ctx, license_arn)
    else:
        raise AwsError(
            "ValidationException", f"Record {index}: ProductCode is required when a record has no LicenseArn."
        )
    if record["Dimension"] not in product.dimension_names():
        raise AwsError(
            "InvalidUsageDimensionException",
            f"Record {index}: dimension {record['Dimension']} is not defined "
            f"for product {product.product_code}.",
        )
    if has_id:
        customer = next((c for c in product.customers if c.customer_identifier == customer_identifier), None)
        if customer is None:
            raise AwsError(
                "InvalidCustomerIdentifierException",
                f"Record {index}: customer {customer_identifier} does not exist.",
            )
        account = customer.aws_account_id
    else:
        account = record["CustomerAWSAccountId"]
    if license_arn is not None and not any(
        c.license_arn == license_arn and c.aws_account_id == account for c in product.customers
    ):
        raise AwsError(
            "InvalidLicenseException", f"Record {index}: license {license_arn} does not match the customer."
        )
    quantity, decimal = _quantity(record, "Quantity", "QuantityAsDecimal")
    if record.get("UsageAllocations") is not None:
        _check_allocations(record["UsageAllocations"], quantity, decimal)
    return _PlannedRecord(record, product, account, license_arn or "", quantity, decimal, timestamp)


def _store_record(
    ctx: EmulatorContext, caller: Caller, planned: _PlannedRecord, now: float
) -> dict[str, Any]:
    """The record's result: kept once per (product, customer, license, dimension, hour)."""
    record, product = planned.record, planned.product
    if planned.account not in product.entitled_accounts:
        return {"UsageRecord": record, "Status": "CustomerNotSubscribed"}
    hour = _hour(planned.timestamp)
    existing = ctx.state.batch_record(
        product.product_code, planned.account, planned.license_arn, record["Dimension"], hour
    )
    if existing is not None:
        if Decimal(existing["quantity"]) != planned.quantity:
            return {"UsageRecord": record, "Status": "DuplicateRecord"}
        return {"UsageRecord": record, "MeteringRecordId": existing["record_id"], "Status": "Success"}
    record_id = str(uuid.uuid4())
    allocations = record.get("UsageAllocations")
    ctx.state.add_batch_record(
        {
            "record_id": record_id,
            "product_code": product.product_code,
            "customer_key": planned.account,
            "license_arn": planned.license_arn,
            "dimension": record["Dimension"],
            "hour": hour,
            "quantity": str(planned.quantity),
            "decimal": int(planned.decimal),
            "allocations": json.dumps(allocations) if allocations else None,
            "timestamp": planned.timestamp,
            "created_at": now,
            "caller": json.dumps(caller.describe()),
        }
    )
    return {"UsageRecord": record, "MeteringRecordId": record_id, "Status": "Success"}


def batch_meter_usage(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require_action(caller, "aws-marketplace:BatchMeterUsage")
    code = body.get("ProductCode")
    request_product = _product(ctx, code) if code is not None else None
    if request_product is not None and request_product.disabled:
        raise AwsError(
            "DisabledApiException", f"The API is disabled for product {request_product.product_code}."
        )
    now = ctx.clock.timestamp()
    planned = [
        _plan_record(ctx, index, record, request_product, now)
        for index, record in enumerate(body["UsageRecords"], start=1)
    ]
    results: list[dict[str, Any]] = []
    unprocessed: list[dict[str, Any]] = []
    for entry in planned:
        if ctx.faults.unprocessed("BatchMeterUsage"):
            unprocessed.append(entry.record)
        else:
            results.append(_store_record(ctx, caller, entry, now))
    return {"Results": results, "UnprocessedRecords": unprocessed}


# -- ResolveCustomer -------------------------------------------------------------------------


def resolve_customer(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require_action(caller, "aws-marketplace:ResolveCustomer")
    token = body["RegistrationToken"]
    entry: dict[str, Any] | None
    configured = next((t for t in ctx.config.registration_tokens if t.token == token), None)
    if configured is not None:
        entry = {
            "productCode": configured.product_code,
            "customerAWSAccountId": configured.customer_aws_account_id,
            "customerIdentifier": configured.customer_identifier,
            "licenseArn": configured.license_arn,
            "expiresAt": configured.expires_at.timestamp() if configured.expires_at else None,
        }
    else:
        entry = ctx.state.registration_token(token)
    if entry is None:
        raise AwsError("InvalidTokenException", "Registration token is invalid.")
    product = ctx.config.product(entry["productCode"])
    if product is not None and product.disabled:
        raise AwsError("DisabledApiException", f"The API is disabled for product {product.product_code}.")
    if entry.get("expiresAt") is not None and entry["expiresAt"] <= ctx.clock.timestamp():
        raise AwsError("ExpiredTokenException", "The submitted registration token has expired.")
    result: dict[str, Any] = {
        "CustomerIdentifier": entry.get("customerIdentifier") or f"cust-{entry['customerAWSAccountId']}",
        "CustomerAWSAccountId": entry["customerAWSAccountId"],
        "ProductCode": entry["productCode"],
    }
    if entry.get("licenseArn"):
        result["LicenseArn"] = entry["licenseArn"]
    return result
