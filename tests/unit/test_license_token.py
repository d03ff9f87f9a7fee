"""License Manager SignedToken verification: pure, with the time passed in.

Tokens are built here the way License Manager documents them (a JWS over the entitlements JSON),
signed with a throwaway issuer key; every check is shown to refuse what it must and to name why.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from metering_operator.domain.clock import ManualClock
from metering_operator.domain.license_token import (
    CheckoutExpectation,
    LicenseTokenError,
    RequiredEntitlement,
    verify_license_token,
)

FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
SKU = "prod-contract1"
ARN = "arn:aws:license-manager::294406891311:license:l-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
CONSUMPTION = "306eb19afd354ba79c3687b9b0000001"
ISSUED = datetime(2031, 7, 9, 10, 20, tzinfo=UTC)
SEAT = RequiredEntitlement("seats", "Count", Decimal(1))


@cache
def issuer_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "entitlementsAllowed": [
            {"name": "seats", "unit": "Count", "value": "1"},
            {"name": "premium", "unit": "None"},
        ],
        "issuedAt": "2031-07-09T10:20:00",
        "expiration": "2031-07-09T11:20:00",
        "licenseArn": ARN,
        "licenseConsumptionToken": CONSUMPTION,
        "nodeId": "node-a",
        "productSKU": SKU,
        "keyFingerprint": FINGERPRINT,
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    payload: dict[str, Any], *, algorithm: str = "PS384", key: Any = None, kid: str | None = FINGERPRINT
) -> str:
    headers = {"typ": "JWT", **({"kid": kid} if kid else {})}
    return jwt.encode(payload, key or issuer_key(), algorithm=algorithm, headers=headers)


def expect(**changes: Any) -> CheckoutExpectation:
    base: dict[str, Any] = {
        "key_fingerprint": FINGERPRINT,
        "product_sku": SKU,
        "license_consumption_token": CONSUMPTION,
        "entitlements": (SEAT, RequiredEntitlement("premium", "None")),
        "license_arn": ARN,
        "node_id": "node-a",
    }
    base.update(changes)
    return CheckoutExpectation(**base)


def reason(token: str, expectation: CheckoutExpectation | None = None, *, at: datetime = ISSUED) -> str:
    with pytest.raises(LicenseTokenError) as exc:
        verify_license_token(token, pem(issuer_key()), expectation or expect(), now=at)
    return exc.value.reason


def test_a_valid_token_verifies_and_reads_back() -> None:
    clock = ManualClock(ISSUED + timedelta(minutes=30))
    verified = verify_license_token(sign(claims()), pem(issuer_key()), expect(), now=clock.now())
    assert verified.license_arn == ARN
    assert verified.license_consumption_token == CONSUMPTION
    assert verified.issued_at == ISSUED
    assert verified.expiration == ISSUED + timedelta(hours=1)
    assert [(e.name, e.unit, e.value) for e in verified.entitlements] == [
        ("seats", "Count", "1"),
        ("premium", "None", None),
    ]
    assert (verified.product_sku, verified.key_fingerprint, verified.algorithm) == (SKU, FINGERPRINT, "PS384")


def test_ps256_is_accepted_too() -> None:
    verified = verify_license_token(
        sign(claims(), algorithm="PS256"), pem(issuer_key()), expect(), now=ISSUED
    )
    assert verified.algorithm == "PS256"


def test_expiry_follows_the_injected_clock_without_grace() -> None:
    clock = ManualClock(ISSUED)
    token = sign(claims())
    clock.advance(timedelta(minutes=59, seconds=59))
    verify_license_token(token, pem(issuer_key()), expect(), now=clock.now())
    clock.advance(timedelta(seconds=1))
    assert reason(token, at=clock.now()) == "Expired"


def test_issued_in_the_future_beyond_skew_is_refused() -> None:
    token = sign(claims(issuedAt="2031-07-09T10:24:00", expiration="2031-07-09T11:24:00"))
    verify_license_token(token, pem(issuer_key()), expect(), now=ISSUED)  # 4 minutes of skew: fine
    late = sign(claims(issuedAt="2031-07-09T10:26:00", expiration="2031-07-09T11:26:00"))
    assert reason(late) == "NotYetValid"


def test_a_token_without_expiration_is_perpetual() -> None:
    verified = verify_license_token(
        sign(claims(expiration=None)), pem(issuer_key()), expect(), now=ISSUED + timedelta(days=400)
    )
    assert verified.expiration is None


def test_zoned_times_are_read_as_written() -> None:
    token = sign(claims(issuedAt="2031-07-09T12:20:00+02:00", expiration="2031-07-09T11:20:00Z"))
    verified = verify_license_token(token, pem(issuer_key()), expect(), now=ISSUED)
    assert verified.issued_at == ISSUED


@pytest.mark.parametrize(
    ("token", "expected_reason"),
    [
        (sign(claims(), key=None, kid="aws:111122223333:Other:issuer-fingerprint"), "WrongKeyFingerprint"),
        (sign(claims(keyFingerprint="aws:111122223333:Other:issuer-fingerprint")), "WrongKeyFingerprint"),
        (sign(claims(productSKU="prod-cheaper")), "WrongProduct"),
        (sign(claims(licenseArn=ARN.replace("0a1b", "ffff"))), "WrongLicense"),
        (sign(claims(licenseConsumptionToken="0" * 32)), "WrongConsumptionToken"),
        (sign(claims(nodeId="node-b")), "WrongNode"),
        (sign(claims(nodeId=None)), "WrongNode"),
        (sign(claims(entitlementsAllowed=[{"name": "premium", "unit": "None"}])), "MissingEntitlement"),
        (
            sign(claims(entitlementsAllowed=[{"name": "seats", "unit": "Gigabytes", "value": "1"}])),
            "MissingEntitlement",
        ),
        (sign(claims(entitlementsAllowed="seats")), "Malformed"),
        (sign(claims(licenseArn=None)), "Malformed"),
        (sign(claims(issuedAt="yesterday")), "Malformed"),
        ("not.a.token", "Malformed"),
    ],
)
def test_each_mismatch_is_refused_with_its_reason(token: str, expected_reason: str) -> None:
    assert reason(token) == expected_reason


def test_a_smaller_grant_than_asked_is_missing() -> None:
    three = expect(entitlements=(RequiredEntitlement("seats", "Count", Decimal(3)),))
    assert reason(sign(claims()), three) == "MissingEntitlement"


def test_claims_aws_does_not_document_may_be_absent() -> None:
    """AWS's documented JSON has no productSKU or keyFingerprint, and the header no kid."""
    token = sign(claims(productSKU=None, keyFingerprint=None), kid=None)
    verified = verify_license_token(token, pem(issuer_key()), expect(), now=ISSUED)
    assert (verified.product_sku, verified.key_fingerprint) == (None, None)


def test_another_key_does_not_verify() -> None:
    assert reason(sign(claims(), key=other_key())) == "BadSignature"


@pytest.mark.parametrize("algorithm", ["RS256", "RS384", "HS256", "none"])
def test_only_rsassa_pss_is_accepted(algorithm: str) -> None:
    if algorithm == "HS256":
        # The classic forgery: an HMAC keyed with the (public) PEM text.
        token = jwt.api_jws.PyJWS().encode(json.dumps(claims()).encode(), b"k" * 32, algorithm="HS256")
    elif algorithm == "none":
        token = jwt.encode(claims(), "", algorithm="none")
    else:
        token = sign(claims(), algorithm=algorithm)
    assert reason(token) == "UnsupportedAlgorithm"


def test_a_non_rsa_key_is_refused_clearly() -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    with pytest.raises(LicenseTokenError) as exc:
        verify_license_token(sign(claims()), ec_pem, expect(), now=ISSUED)
    assert exc.value.reason == "BadKey"


def test_naive_now_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="naive"):
        verify_license_token(sign(claims()), pem(issuer_key()), expect(), now=datetime(2031, 7, 9, 10, 30))


def test_without_an_issuer_key_the_claims_are_still_checked_but_not_the_signature() -> None:
    # Signed by some other key: nothing can tell, without the issuer's key (documented).
    unverifiable = sign(claims(), key=other_key())
    verified = verify_license_token(unverifiable, None, expect(), now=ISSUED)
    assert verified.license_consumption_token == CONSUMPTION
    # Every claim must still match the checkout's own answer ...
    for changed, why in (
        (claims(licenseConsumptionToken="f" * 32), "WrongConsumptionToken"),
        (claims(nodeId="node-b"), "WrongNode"),
        (
            claims(entitlementsAllowed=[{"name": "seats", "unit": "Count", "value": "1"}]),
            "MissingEntitlement",
        ),
    ):
        with pytest.raises(LicenseTokenError) as exc:
            verify_license_token(sign(changed, key=other_key()), None, expect(), now=ISSUED)
        assert exc.value.reason == why
    # ... and the algorithm stays pinned: no "none", no HMAC.
    with pytest.raises(LicenseTokenError) as exc:
        verify_license_token(jwt.encode(claims(), "k" * 32, algorithm="HS256"), None, expect(), now=ISSUED)
    assert exc.value.reason == "UnsupportedAlgorithm"
