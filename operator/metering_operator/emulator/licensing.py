"""AWS License Manager, as container contracts use it: CheckoutLicense, ExtendLicenseConsumption,
CheckInLicense, GetLicense and ListReceivedLicenses.

The configuration's ``licenses`` are the contracts buyers bought: one license per buyer account,
issued (and signed) by an issuer named by its key fingerprint, with entitlements that are counted
(``maxCount``: floating seats, with or without overage) or plain features (unit ``None``).

Rules the emulator applies (AWS documents the operations, not which condition answers which error;
where it is silent the choice is the emulator's and docs/emulator.md says so):

* A PROVISIONAL checkout holds its seats for the license's provisional time to live (AWS: 60
  minutes) of the emulator's clock unless checked in or extended; a PERPETUAL checkout draws the
  seats down for good (it is never returned and cannot be extended).
* A checkout is all or nothing: every requested entitlement must be in the license with that unit
  and, when counted, fit within ``maxCount`` (unless ``overage``), else NoEntitlementsAllowed.
* ``ClientToken`` makes CheckoutLicense idempotent per account: the same request again gets the
  same answer and holds no second seat; the token with other parameters is a ValidationException.
* The SignedToken is a JWS (PS384, the one signature method License Manager's model names) over
  the JSON AWS's License Manager guide shows (``entitlementsAllowed``, ``expiration``,
  ``issuedAt``, ``licenseArn``, ``licenseConsumptionToken``, ``nodeId``) plus the emulator's own
  ``productSKU``, ``keyFingerprint``, ``checkoutType`` and ``beneficiary``, with the issuer's key
  fingerprint as ``kid``, signed by the issuer's key (public half served by the admin API).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import jwt

from metering_operator.emulator.config import KEY_FINGERPRINT_RE, License, LicenseEntitlement
from metering_operator.emulator.context import EmulatorContext
from metering_operator.emulator.errors import AwsError
from metering_operator.emulator.identity import Caller
from metering_operator.emulator.state import Checkout

SERVICE = "license-manager"
SIGNING_ALGORITHM = "PS384"
_TOKEN_RE = re.compile(r"^[0-9a-f]{32}$")
_FILTERS = ("ProductSKU", "Status", "Fingerprint", "IssuerName", "Beneficiary")
# ListReceivedLicenses: more LicenseArns than this in one call answers ResourceLimitExceeded.
MAX_LICENSE_ARNS = 50
_ALLOWED_OPERATIONS = [
    "CheckoutLicense",
    "CheckInLicense",
    "ExtendConsumptionLicense",
    "ListReceivedLicenses",
]


def _iso(epoch: float) -> str:
    """ISO 8601 UTC with a zone, as the model's ISO8601DateTime pattern demands."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _claim_time(epoch: float) -> str:
    """Times inside the signed JSON, written like AWS's example (UTC, no zone)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _require(caller: Caller, operation: str) -> None:
    action = f"{SERVICE}:{operation}"
    if not caller.allowed(action):
        raise AwsError(
            "AccessDeniedException",
            f"User: {caller.arn} is not authorized to perform: {action} "
            "because no identity-based policy allows it",
        )


def _consumption_token(body: dict[str, Any]) -> str:
    token = str(body["LicenseConsumptionToken"])
    if not token:
        raise AwsError(
            "ValidationException",
            "1 validation error detected: Value at 'licenseConsumptionToken' failed to satisfy "
            "constraint: Member must have length greater than or equal to 1",
        )
    if not _TOKEN_RE.match(token):
        raise AwsError("InvalidParameterValueException", "LicenseConsumptionToken is not a valid token.")
    return token


def _own_checkout(ctx: EmulatorContext, caller: Caller, token: str, now: float) -> Checkout:
    checkout = ctx.state.checkout(token)
    if checkout is None:
        raise AwsError("ResourceNotFoundException", f"License consumption token {token} was not found.")
    if checkout.account != caller.account:
        raise AwsError(
            "AuthorizationException",
            f"Account {caller.account} is not authorized to use license consumption token {token}.",
        )
    if checkout.checked_in_at is not None:
        raise AwsError("ResourceNotFoundException", f"License consumption token {token} was checked in.")
    if not checkout.active(now):
        raise AwsError(
            "ResourceNotFoundException",
            f"License consumption token {token} expired at {_iso(checkout.expiration or now)}.",
        )
    return checkout


# -- entitlements and seats ------------------------------------------------------------------


def _amount(value: Any, name: str) -> Decimal:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        amount = Decimal(-1)
    if not amount.is_finite() or amount <= 0:
        raise AwsError(
            "InvalidParameterValueException",
            f"Entitlement {name}: Value must be a positive number, not {str(value)[:40]!r}.",
        )
    return amount


def _requested(entitlements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not entitlements:
        raise AwsError("ValidationException", "Entitlements must contain at least one entitlement.")
    names = [e["Name"] for e in entitlements]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise AwsError("InvalidParameterValueException", f"Entitlement {dupes[0]} is requested twice.")
    for entitlement in entitlements:
        if entitlement["Unit"] != "None":
            _amount(entitlement.get("Value", "1"), entitlement["Name"])
    return entitlements


def _quantity(entitlement: dict[str, Any]) -> Decimal:
    """Units one checkout of this entitlement holds (``None`` units are features: nothing counted)."""
    if entitlement["Unit"] == "None":
        return Decimal(0)
    return Decimal(str(entitlement.get("Value", "1")))


def in_use(ctx: EmulatorContext, license_arn: str, name: str, now: float) -> Decimal:
    """Units of entitlement ``name`` that active checkouts of the license hold at ``now``."""
    total = Decimal(0)
    for checkout in ctx.state.checkouts(license_arn, active_at=now):
        total += sum((_quantity(e) for e in checkout.entitlements if e["Name"] == name), Decimal(0))
    return total


def _check_fits(ctx: EmulatorContext, lic: License, wanted: dict[str, Any], now: float) -> None:
    name, unit = wanted["Name"], wanted["Unit"]
    entitlement = lic.entitlement(name)
    if entitlement is None or entitlement.unit != unit:
        raise AwsError(
            "NoEntitlementsAllowedException",
            f"No entitlements allowed for the given license: {lic.license_arn} has no entitlement "
            f"{name} in unit {unit}.",
        )
    if unit == "None" or entitlement.max_count is None or entitlement.overage:
        return
    held = in_use(ctx, lic.license_arn, name, now)
    asked = _quantity(wanted)
    if held + asked > entitlement.max_count:
        raise AwsError(
            "NoEntitlementsAllowedException",
            f"No entitlements allowed for the given license: {name} has {entitlement.max_count} "
            f"{unit}, {held} in use, {asked} asked for.",
        )


# -- CheckoutLicense -------------------------------------------------------------------------


def _license_for(ctx: EmulatorContext, caller: Caller, sku: str, fingerprint: str) -> License:
    if not KEY_FINGERPRINT_RE.match(fingerprint):
        raise AwsError(
            "InvalidParameterValueException",
            f"KeyFingerprint {fingerprint[:100]!r} is not a key fingerprint "
            "(aws:<account>:<issuer>:issuer-fingerprint).",
        )
    issued = [lic for lic in ctx.config.licenses if lic.issuer.key_fingerprint == fingerprint]
    if not issued:
        raise AwsError("ResourceNotFoundException", f"No license issuer with key fingerprint {fingerprint}.")
    lic = next((x for x in issued if x.product_sku == sku and x.buyer_account == caller.account), None)
    if lic is None:
        raise AwsError(
            "NoEntitlementsAllowedException",
            f"No entitlements allowed for the given license: account {caller.account} holds no "
            f"license for product SKU {sku} from this issuer.",
        )
    return lic


def _check_region(ctx: EmulatorContext, caller: Caller, lic: License) -> None:
    home = lic.home_region or ctx.config.region
    if home and caller.region != home:
        raise AwsError(
            "RedirectException",
            f"The license {lic.license_arn} lives in {home}; call License Manager there.",
            extra={"Location": f"https://license-manager.{home}.amazonaws.com"},
        )


def _check_usable(lic: License, now: float) -> None:
    if lic.received_status != "ACTIVE":
        raise AwsError(
            "AuthorizationException",
            f"The grant of license {lic.license_arn} is {lic.received_status}, not ACTIVE.",
        )
    if lic.issuer.signature_method == "None":
        raise AwsError(
            "UnsupportedDigitalSignatureMethodException",
            f"The issuer {lic.issuer.name} has no key that can sign checkouts (JWT_PS384).",
        )
    ended = lic.valid_until is not None and now >= lic.valid_until.timestamp()
    early = now < lic.valid_from.timestamp()
    if lic.status != "AVAILABLE" or ended or early:
        state = "EXPIRED" if ended else ("not valid yet" if early else lic.status)
        raise AwsError(
            "NoEntitlementsAllowedException",
            f"No entitlements allowed for the given license: {lic.license_arn} is {state}.",
        )


def _request_hash(body: dict[str, Any]) -> str:
    without_token = {k: v for k, v in body.items() if k != "ClientToken"}
    return hashlib.sha256(json.dumps(without_token, sort_keys=True, default=str).encode()).hexdigest()


def signed_token(
    ctx: EmulatorContext, lic: License, checkout: Checkout, granted: list[dict[str, Any]]
) -> str:
    claims: dict[str, Any] = {
        "entitlementsAllowed": [{k.lower(): v for k, v in entitlement.items()} for entitlement in granted],
        "issuedAt": _claim_time(checkout.issued_at),
        "licenseArn": lic.license_arn,
        "licenseConsumptionToken": checkout.token,
        # Not in AWS's documented JSON: the emulator's, so a verifier can bind more.
        "productSKU": lic.product_sku,
        "keyFingerprint": lic.issuer.key_fingerprint,
        "checkoutType": checkout.checkout_type,
    }
    if checkout.expiration is not None:
        claims["expiration"] = _claim_time(checkout.expiration)
    if checkout.node_id is not None:
        claims["nodeId"] = checkout.node_id
    if checkout.beneficiary is not None:
        claims["beneficiary"] = checkout.beneficiary
    return jwt.encode(
        claims,
        ctx.keys.issuer_private_key(lic.issuer.key_fingerprint),
        algorithm=SIGNING_ALGORITHM,
        headers={"typ": "JWT", "kid": lic.issuer.key_fingerprint},
    )


def checkout_license(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require(caller, "CheckoutLicense")
    wanted = _requested(body["Entitlements"])
    scope = f"{SERVICE}:{caller.account}"
    request_hash = _request_hash(body)
    seen = ctx.state.client_token(scope, body["ClientToken"])
    if seen is not None:
        if seen["request_hash"] != request_hash:
            raise AwsError(
                "ValidationException", "The ClientToken was already used with different request parameters."
            )
        replay: dict[str, Any] = json.loads(seen["response"])
        return replay
    lic = _license_for(ctx, caller, body["ProductSKU"], body["KeyFingerprint"])
    _check_region(ctx, caller, lic)
    now = ctx.clock.timestamp()
    _check_usable(lic, now)
    for entitlement in wanted:
        _check_fits(ctx, lic, entitlement, now)
    checkout_type = body["CheckoutType"]
    if checkout_type == "PROVISIONAL":
        expiration: float | None = now + lic.provisional_ttl_minutes * 60
    else:
        expiration = lic.valid_until.timestamp() if lic.valid_until is not None else None
    granted = [
        {"Name": e["Name"], "Unit": e["Unit"], **({"Value": str(e["Value"])} if "Value" in e else {})}
        for e in wanted
    ]
    checkout = Checkout(
        token=uuid.uuid4().hex,
        license_arn=lic.license_arn,
        account=caller.account,
        caller_key=caller.key,
        checkout_type=checkout_type,
        entitlements=granted,
        node_id=body.get("NodeId"),
        beneficiary=body.get("Beneficiary"),
        issued_at=now,
        expiration=expiration,
        extended=0,
        checked_in_at=None,
        identity=caller.describe(),
    )
    ctx.state.add_checkout(checkout)
    response: dict[str, Any] = {
        "CheckoutType": checkout_type,
        "LicenseConsumptionToken": checkout.token,
        "EntitlementsAllowed": granted,
        "SignedToken": signed_token(ctx, lic, checkout, granted),
        "IssuedAt": _iso(now),
        "LicenseArn": lic.license_arn,
    }
    if expiration is not None:
        response["Expiration"] = _iso(expiration)
    if checkout.node_id is not None:
        response["NodeId"] = checkout.node_id
    ctx.state.add_client_token(scope, body["ClientToken"], request_hash, response)
    return response


# -- ExtendLicenseConsumption / CheckInLicense -----------------------------------------------


def extend_license_consumption(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require(caller, "ExtendLicenseConsumption")
    token = _consumption_token(body)
    now = ctx.clock.timestamp()
    checkout = _own_checkout(ctx, caller, token, now)
    if checkout.checkout_type != "PROVISIONAL":
        raise AwsError(
            "InvalidParameterValueException", "Only PROVISIONAL checkouts can be extended; this is PERPETUAL."
        )
    lic = ctx.config.license(checkout.license_arn)
    if lic is None:
        raise AwsError("ResourceNotFoundException", f"License {checkout.license_arn} no longer exists.")
    if body.get("DryRun"):
        # Permission and token checked; nothing changes (the emulator's reading of DryRun).
        return {"LicenseConsumptionToken": token, "Expiration": _iso(checkout.expiration or now)}
    expiration = now + lic.provisional_ttl_minutes * 60
    ctx.state.extend_checkout(token, expiration)
    return {"LicenseConsumptionToken": token, "Expiration": _iso(expiration)}


def check_in_license(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require(caller, "CheckInLicense")
    token = _consumption_token(body)
    now = ctx.clock.timestamp()
    checkout = _own_checkout(ctx, caller, token, now)
    beneficiary = body.get("Beneficiary")
    if beneficiary is not None and beneficiary != checkout.beneficiary:
        raise AwsError(
            "InvalidParameterValueException",
            "Beneficiary differs from the one the license was checked out for.",
        )
    lic = ctx.config.license(checkout.license_arn)
    locked: list[LicenseEntitlement] = []
    if lic is not None:
        for granted in checkout.entitlements:
            entitlement = lic.entitlement(granted["Name"])
            if entitlement is not None and not entitlement.allow_check_in:
                locked.append(entitlement)
    if checkout.checkout_type == "PERPETUAL" or locked:
        what = f"entitlement {locked[0].name} does not allow check-in" if locked else "it is PERPETUAL"
        raise AwsError("ConflictException", f"Checkout {token} cannot be checked in: {what}.")
    ctx.state.check_in(token, now)
    return {}


# -- GetLicense / ListReceivedLicenses -------------------------------------------------------


def license_view(lic: License, now: float, *, received: bool = False) -> dict[str, Any]:
    ended = lic.valid_until is not None and now >= lic.valid_until.timestamp()
    validity: dict[str, Any] = {"Begin": _iso(lic.valid_from.timestamp())}
    if lic.valid_until is not None:
        validity["End"] = _iso(lic.valid_until.timestamp())
    entitlements = []
    for entitlement in lic.entitlements:
        view: dict[str, Any] = {
            "Name": entitlement.name,
            "Unit": entitlement.unit,
            "Overage": entitlement.overage,
            "AllowCheckIn": entitlement.allow_check_in,
        }
        if entitlement.max_count is not None:
            view["MaxCount"] = entitlement.max_count
        if entitlement.value is not None:
            view["Value"] = entitlement.value
        entitlements.append(view)
    result: dict[str, Any] = {
        "LicenseArn": lic.license_arn,
        "LicenseName": lic.license_name,
        "ProductName": lic.product_name,
        "ProductSKU": lic.product_sku,
        "Issuer": {"Name": lic.issuer.name, "KeyFingerprint": lic.issuer.key_fingerprint},
        "Status": "EXPIRED" if ended and lic.status == "AVAILABLE" else lic.status,
        "Validity": validity,
        "Beneficiary": lic.buyer_account,
        "Entitlements": entitlements,
        "ConsumptionConfiguration": {
            "RenewType": "None",
            "ProvisionalConfiguration": {"MaxTimeToLiveInMinutes": lic.provisional_ttl_minutes},
        },
        "CreateTime": _iso(lic.valid_from.timestamp()),
        "Version": "1",
    }
    if lic.home_region:
        result["HomeRegion"] = lic.home_region
    if received:
        result["ReceivedMetadata"] = {
            "ReceivedStatus": lic.received_status,
            "AllowedOperations": _ALLOWED_OPERATIONS,
            "GrantType": "BuyerGrant",
        }
    return result


def get_license(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require(caller, "GetLicense")
    arn = body["LicenseArn"]
    lic = ctx.config.license(arn)
    if lic is None:
        raise AwsError("InvalidParameterValueException", f"License {arn} does not exist.")
    if lic.buyer_account != caller.account:
        raise AwsError("AuthorizationException", f"Account {caller.account} has not received license {arn}.")
    version = body.get("Version")
    if version is not None and version != "1":
        raise AwsError("InvalidParameterValueException", f"License {arn} has no version {version[:20]!r}.")
    return {"License": license_view(lic, ctx.clock.timestamp())}


def _filter_value(lic: License, name: str) -> str:
    return {
        "ProductSKU": lic.product_sku,
        "Status": lic.status,
        "Fingerprint": lic.issuer.key_fingerprint,
        "IssuerName": lic.issuer.name,
        "Beneficiary": lic.buyer_account,
    }[name]


def _offset(next_token: str | None) -> int:
    if next_token is None:
        return 0
    try:
        offset = int(base64.urlsafe_b64decode(next_token.encode()).decode().removeprefix("offset:"))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise AwsError("InvalidParameterValueException", "NextToken is not valid.") from None
    if offset < 0:
        raise AwsError("InvalidParameterValueException", "NextToken is not valid.")
    return offset


def list_received_licenses(ctx: EmulatorContext, caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    _require(caller, "ListReceivedLicenses")
    arns = body.get("LicenseArns") or []
    if len(arns) > MAX_LICENSE_ARNS:
        raise AwsError(
            "ResourceLimitExceededException", f"At most {MAX_LICENSE_ARNS} LicenseArns per request."
        )
    filters = body.get("Filters") or []
    for entry in filters:
        if entry.get("Name") not in _FILTERS:
            raise AwsError(
                "InvalidParameterValueException",
                f"Filter {str(entry.get('Name'))[:40]!r} is not supported "
                f"(supported: {', '.join(_FILTERS)}).",
            )
        if entry["Name"] == "Beneficiary" and set(entry.get("Values") or []) - {caller.account}:
            raise AwsError(
                "AuthorizationException",
                f"Account {caller.account} may only list the licenses it received itself.",
            )
    offset = _offset(body.get("NextToken"))
    limit = int(body.get("MaxResults") or 100)
    mine = [
        lic
        for lic in ctx.config.licenses
        if lic.buyer_account == caller.account
        and (not arns or lic.license_arn in arns)
        and all(_filter_value(lic, f["Name"]) in (f.get("Values") or []) for f in filters)
    ]
    now = ctx.clock.timestamp()
    page = mine[offset : offset + limit]
    result: dict[str, Any] = {"Licenses": [license_view(lic, now, received=True) for lic in page]}
    if offset + limit < len(mine):
        result["NextToken"] = base64.urlsafe_b64encode(f"offset:{offset + limit}".encode()).decode()
    return result
