"""PS256 RegisterUsage signature checks, with keys generated here (pure, no emulator)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from metering_operator.domain.signature import SignatureError, load_public_key, verify_signature

CODE = "1fszvu527waovqeuhpkyx2b5d"


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def pem(private: rsa.RSAPrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def token(private: rsa.RSAPrivateKey, alg: str = "PS256", **overrides: Any) -> str:
    claims: dict[str, object] = {
        "productCode": CODE,
        "publicKeyVersion": 1,
        "nonce": "uid-1",
        "iat": 1_700_000_000,
    }
    claims.update(overrides)
    return jwt.encode(claims, private, algorithm=alg)


def test_valid_signature_verifies(key: rsa.RSAPrivateKey) -> None:
    result = verify_signature(token(key), pem(key), product_code=CODE, public_key_version=1, nonce="uid-1")
    assert result.nonce == "uid-1"
    assert result.public_key_version == 1
    assert result.issued_at is not None
    assert result.issued_at.year == 2023


def test_wrong_key_is_refused(key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(token(other_key), pem(key), product_code=CODE, public_key_version=1, nonce="uid-1")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"productCode": "other"}, "productCode"),
        ({"publicKeyVersion": 2}, "publicKeyVersion"),
        ({"publicKeyVersion": True}, "publicKeyVersion"),
        ({"nonce": "uid-2"}, "nonce"),
    ],
)
def test_claim_mismatch_is_refused(key: rsa.RSAPrivateKey, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        verify_signature(
            token(key, **overrides), pem(key), product_code=CODE, public_key_version=1, nonce="uid-1"
        )


def test_rs256_is_refused_even_with_the_right_key(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="PS256"):
        verify_signature(
            token(key, alg="RS256"), pem(key), product_code=CODE, public_key_version=1, nonce="uid-1"
        )


def test_hs256_forged_with_public_key_is_refused(key: rsa.RSAPrivateKey) -> None:
    forged = jwt.encode(
        {"productCode": CODE, "publicKeyVersion": 1, "nonce": "uid-1"},
        "a-secret-that-is-long-enough-for-hmac-sha256",
        algorithm="HS256",
    )
    with pytest.raises(SignatureError, match="PS256"):
        verify_signature(forged, pem(key), product_code=CODE, public_key_version=1, nonce="uid-1")


def test_garbage_and_alg_none_are_refused(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(SignatureError, match="not a JWT"):
        verify_signature("not-a-jwt", pem(key), product_code=CODE, public_key_version=1, nonce=None)
    unsigned = jwt.encode({"productCode": CODE}, "", algorithm="none")
    with pytest.raises(SignatureError):
        verify_signature(unsigned, pem(key), product_code=CODE, public_key_version=1, nonce=None)


def test_tampered_payload_is_refused(key: rsa.RSAPrivateKey) -> None:
    good = token(key)
    header, _, sig = good.split(".")
    other_payload = token(key, nonce="uid-2").split(".")[1]
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(
            f"{header}.{other_payload}.{sig}",
            pem(key),
            product_code=CODE,
            public_key_version=1,
            nonce="uid-2",
        )


def test_bad_public_keys_are_clear_errors() -> None:
    with pytest.raises(SignatureError, match="not a valid PEM"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SignatureError, match="must be RSA"):
        load_public_key(ec_pem)


def test_verify_command_exit_codes(
    key: rsa.RSAPrivateKey, other_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(pem(key))
    base = [
        sys.executable,
        "-m",
        "metering_operator.cli",
        "verify",
        "--product-code",
        CODE,
        "--public-key-version",
        "1",
        "--nonce",
        "uid-1",
        "--public-key",
        str(key_file),
    ]
    ok = subprocess.run([*base, token(key)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "VALID" in ok.stdout
    bad = subprocess.run([*base, token(other_key)], capture_output=True, text=True, check=False)
    assert bad.returncode == 1
    assert "INVALID" in bad.stdout
    assert "does not verify" in bad.stdout
    token_file = tmp_path / "jwt"
    token_file.write_text(token(key, nonce="uid-9") + "\n")
    wrong_nonce = subprocess.run([*base, f"@{token_file}"], capture_output=True, text=True, check=False)
    assert wrong_nonce.returncode == 1
    assert "nonce" in wrong_nonce.stdout
