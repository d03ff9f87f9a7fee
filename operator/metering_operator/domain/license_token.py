"""Verify the SignedToken that AWS License Manager's CheckoutLicense returns.

What AWS documents (License Manager user guide, "Cryptographic signing of licenses"): License
Manager signs a JSON object listing the checked-out entitlements with the issuer's asymmetric KMS
key, which must support RSASSA-PSS with SHA-256; the documented JSON carries
``entitlementsAllowed`` (``name``, ``unit``, ``value``), ``expiration``, ``issuedAt``,
``licenseArn``, ``licenseConsumptionToken``, ``nodeId`` and ``checkoutMetadata``, and the one
``DigitalSignatureMethod`` License Manager's API names is ``JWT_PS384``. So the token is read as a
JWS whose algorithm must be RSASSA-PSS (PS384, or PS256); the algorithm is pinned to that set and
never taken on trust from the header (that is how ``alg: none`` and HMAC-with-the-public-key
forgeries get in).

What is checked, each failure with its own reason (so a condition or Event can say which):

* ``UnsupportedAlgorithm``  not PS384/PS256;
* ``BadSignature``          the signature does not verify with the issuer's public key;
* ``WrongKeyFingerprint``   a ``kid`` header or ``keyFingerprint`` claim names another issuer key;
* ``WrongProduct``          a ``productSKU`` claim names another product;
* ``WrongLicense`` / ``WrongConsumptionToken``  the token is not the one this checkout returned
  (replaying another pod's or an older checkout's token);
* ``MissingEntitlement``    an entitlement asked for is absent, in another unit or smaller;
* ``Expired`` / ``NotYetValid``  by the injected clock (no grace after ``expiration``; ``issuedAt``
  may be up to five minutes ahead, for clock skew between AWS and the cluster);
* ``WrongNode`` / ``WrongBeneficiary``  the token was checked out for another node or beneficiary.

What cannot be checked against AWS as documented: AWS does not publish the JWS header of
CheckoutLicense's token, any claim beyond that example, nor where AWS Marketplace's issuer public
key (``aws:294406891311:AWS/Marketplace:issuer-fingerprint``) is published. ``productSKU`` and
``keyFingerprint`` claims are therefore compared when present and not required: against AWS the
product binding rests on the checkout request itself (sent over TLS to AWS with that SKU and key
fingerprint) and on the token's ``licenseArn`` and ``licenseConsumptionToken`` matching the answer.
The emulator's tokens carry both claims. Pure: no I/O, time comes in as ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from metering_operator.domain.clock import ensure_utc
from metering_operator.domain.signature import SignatureError, load_public_key

ALGORITHMS = ("PS384", "PS256")
#: How far in the future ``issuedAt`` may lie (AWS's clock against ours), never applied to expiry.
ISSUED_AT_LEEWAY = timedelta(minutes=5)


class LicenseTokenError(ValueError):
    """The SignedToken is not a valid License Manager token for this checkout; ``reason`` says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class RequiredEntitlement:
    """An entitlement the checkout asked for: ``quantity`` None for features (unit ``None``)."""

    name: str
    unit: str
    quantity: Decimal | None = None


@dataclass(frozen=True)
class CheckoutExpectation:
    """What the operator sent to CheckoutLicense and read back, which the token must repeat."""

    key_fingerprint: str
    product_sku: str
    license_consumption_token: str
    entitlements: Sequence[RequiredEntitlement]
    license_arn: str | None = None
    node_id: str | None = None
    beneficiary: str | None = None


@dataclass(frozen=True)
class GrantedEntitlement:
    name: str
    unit: str
    value: str | None


@dataclass(frozen=True)
class VerifiedLicenseToken:
    license_arn: str
    license_consumption_token: str
    entitlements: tuple[GrantedEntitlement, ...]
    issued_at: datetime
    expiration: datetime | None
    node_id: str | None
    product_sku: str | None
    key_fingerprint: str | None
    algorithm: str
    claims: dict[str, Any]
    token: str


def parse_time(value: Any, claim: str) -> datetime:
    """A token time: ISO 8601, UTC when no zone is written (as in AWS's documented example)."""
    if not isinstance(value, str):
        raise LicenseTokenError("Malformed", f"claim {claim} must be an ISO 8601 time, got {value!r}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise LicenseTokenError("Malformed", f"claim {claim} is not an ISO 8601 time: {value!r}") from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def _decimal(value: Any) -> Decimal | None:
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    return amount if amount.is_finite() else None


def _granted(claims: dict[str, Any]) -> tuple[GrantedEntitlement, ...]:
    raw = claims.get("entitlementsAllowed")
    if not isinstance(raw, list):
        raise LicenseTokenError("Malformed", "claim entitlementsAllowed must be a list")
    granted = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise LicenseTokenError("Malformed", f"entitlementsAllowed entry {item!r} has no name")
        value = item.get("value")
        granted.append(
            GrantedEntitlement(
                str(item["name"]), str(item.get("unit")), None if value is None else str(value)
            )
        )
    return tuple(granted)


def _check_entitlements(
    granted: tuple[GrantedEntitlement, ...], wanted: Sequence[RequiredEntitlement]
) -> None:
    for need in wanted:
        match = next((g for g in granted if g.name == need.name), None)
        if match is None:
            raise LicenseTokenError("MissingEntitlement", f"entitlement {need.name} is not in the token")
        if match.unit != need.unit:
            raise LicenseTokenError(
                "MissingEntitlement", f"entitlement {need.name} is in unit {match.unit}, not {need.unit}"
            )
        if need.quantity is not None:
            got = _decimal(match.value) if match.value is not None else None
            if got is None or got < need.quantity:
                raise LicenseTokenError(
                    "MissingEntitlement",
                    f"entitlement {need.name} grants {match.value!r}, {need.quantity} was asked for",
                )


def _same(reason: str, claim: str, got: Any, want: str | None) -> None:
    if want is not None and got is not None and got != want:
        raise LicenseTokenError(reason, f"{claim} is {got!r}, expected {want!r}")


def verify_license_token(
    token: str,
    public_key: RSAPublicKey | str | bytes | None,
    expected: CheckoutExpectation,
    *,
    now: datetime,
    leeway: timedelta = ISSUED_AT_LEEWAY,
) -> VerifiedLicenseToken:
    """Check the token's signature and that it grants ``expected`` at ``now``; LicenseTokenError if not.

    ``public_key`` None (a product without ``issuerPublicKey``: AWS does not publish where AWS
    Marketplace's issuer key is) checks everything but the signature itself: the algorithm is
    still pinned, and every claim must match the answer CheckoutLicense gave over TLS."""
    now = ensure_utc(now)
    key: RSAPublicKey | None = None
    try:
        if public_key is not None:
            key = public_key if isinstance(public_key, RSAPublicKey) else load_public_key(public_key)
    except SignatureError as exc:
        raise LicenseTokenError("BadKey", str(exc)) from None
    token = token.strip()
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise LicenseTokenError("Malformed", f"not a JWS: {exc}") from None
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        raise LicenseTokenError(
            "UnsupportedAlgorithm",
            f"algorithm must be one of {', '.join(ALGORITHMS)}, token says {algorithm!r}",
        )
    _same("WrongKeyFingerprint", "kid", header.get("kid"), expected.key_fingerprint)
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key if key is not None else "",
            algorithms=[str(algorithm)],
            # Expiry is License Manager's own claim, checked below with the injected clock.
            options={
                "require": [],
                "verify_signature": key is not None,
                "verify_exp": False,
                "verify_iat": False,
                "verify_nbf": False,
            },
        )
    except jwt.InvalidSignatureError:
        raise LicenseTokenError(
            "BadSignature", "signature does not verify with the issuer's public key"
        ) from None
    except jwt.PyJWTError as exc:
        raise LicenseTokenError("Malformed", f"invalid JWS: {exc}") from None

    _same("WrongKeyFingerprint", "keyFingerprint", claims.get("keyFingerprint"), expected.key_fingerprint)
    _same("WrongProduct", "productSKU", claims.get("productSKU"), expected.product_sku)
    consumption = claims.get("licenseConsumptionToken")
    if consumption != expected.license_consumption_token:
        raise LicenseTokenError(
            "WrongConsumptionToken",
            f"licenseConsumptionToken is {consumption!r}, not the one this checkout returned",
        )
    license_arn = claims.get("licenseArn")
    if not isinstance(license_arn, str) or not license_arn:
        raise LicenseTokenError("Malformed", "claim licenseArn is missing")
    _same("WrongLicense", "licenseArn", license_arn, expected.license_arn)
    granted = _granted(claims)
    _check_entitlements(granted, expected.entitlements)
    issued_at = parse_time(claims.get("issuedAt"), "issuedAt")
    if issued_at > now + leeway:
        raise LicenseTokenError(
            "NotYetValid", f"issued at {issued_at.isoformat()}, after now ({now.isoformat()})"
        )
    expiration = None
    if claims.get("expiration") is not None:
        expiration = parse_time(claims["expiration"], "expiration")
        if now >= expiration:
            raise LicenseTokenError("Expired", f"expired at {expiration.isoformat()} (now {now.isoformat()})")
    node_id = claims.get("nodeId")
    if expected.node_id is not None and node_id != expected.node_id:
        raise LicenseTokenError("WrongNode", f"nodeId is {node_id!r}, expected {expected.node_id!r}")
    beneficiary = claims.get("beneficiary")
    _same("WrongBeneficiary", "beneficiary", beneficiary, expected.beneficiary)
    return VerifiedLicenseToken(
        license_arn=license_arn,
        license_consumption_token=str(consumption),
        entitlements=granted,
        issued_at=issued_at,
        expiration=expiration,
        node_id=node_id if isinstance(node_id, str) else None,
        product_sku=claims.get("productSKU") if isinstance(claims.get("productSKU"), str) else None,
        key_fingerprint=claims.get("keyFingerprint")
        if isinstance(claims.get("keyFingerprint"), str)
        else None,
        algorithm=str(algorithm),
        claims=claims,
        token=token,
    )
