"""Verify the JWT that RegisterUsage returns.

AWS signs ``{"productCode", "publicKeyVersion", "nonce", "iat"}`` with the product's RSA key
using PS256. The algorithm is pinned (never read from the token header: that is how "alg: none"
and HS256-with-the-public-key forgeries get in), and every claim we sent must come back
unchanged. Any failure raises :class:`SignatureError`; callers treat it as an error, never a grant.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

ALGORITHM = "PS256"


class SignatureError(ValueError):
    """The signature is not a valid RegisterUsage JWT for what was asked."""


@dataclass(frozen=True)
class VerifiedSignature:
    product_code: str
    public_key_version: int
    nonce: str | None
    issued_at: datetime | None
    claims: dict[str, Any]
    #: The verified JWT itself, as it is recorded in annotations and status.
    token: str


def load_public_key(pem: str | bytes) -> RSAPublicKey:
    """Parse a PEM RSA public key; SignatureError with a clear reason otherwise."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = load_pem_public_key(data)
    except ValueError as exc:
        raise SignatureError(f"public key is not a valid PEM public key: {exc}") from None
    if not isinstance(key, RSAPublicKey):
        raise SignatureError(f"public key must be RSA (PS256), got {type(key).__name__}")
    return key


@dataclass(frozen=True)
class ProductKey:
    """What proves a registration for one product: its code, key version and public key."""

    product_code: str
    public_key_version: int
    public_key: RSAPublicKey

    def verify(self, token: str, nonce: str) -> VerifiedSignature:
        """Check a RegisterUsage signature for this product and ``nonce``; raises SignatureError."""
        return verify_signature(
            token,
            self.public_key,
            product_code=self.product_code,
            public_key_version=self.public_key_version,
            nonce=nonce,
        )


def verify_signature(
    token: str,
    public_key: RSAPublicKey | str | bytes,
    *,
    product_code: str,
    public_key_version: int,
    nonce: str | None,
) -> VerifiedSignature:
    """Check signature (PS256 only) and that productCode, publicKeyVersion and nonce match."""
    key = public_key if isinstance(public_key, RSAPublicKey) else load_public_key(public_key)
    token = token.strip()
    try:
        # One parse of the token: the algorithm is pinned by ``algorithms`` (PyJWT refuses any
        # other header ``alg`` before verifying); the header is read again only to say why.
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            # AWS's token has no exp/aud; iat is checked for shape below, not freshness.
            options={"require": [], "verify_aud": False, "verify_iat": False},
        )
    except jwt.InvalidAlgorithmError:
        alg = jwt.get_unverified_header(token).get("alg")
        raise SignatureError(f"algorithm must be {ALGORITHM}, token says {alg!r}") from None
    except jwt.InvalidSignatureError:
        raise SignatureError("signature does not verify with the product's public key") from None
    except jwt.DecodeError as exc:
        raise SignatureError(f"not a JWT: {exc}") from None
    except jwt.PyJWTError as exc:
        raise SignatureError(f"invalid JWT: {exc}") from None

    got_code = claims.get("productCode")
    if got_code != product_code:
        raise SignatureError(f"productCode claim {got_code!r} does not match {product_code!r}")
    got_version = claims.get("publicKeyVersion")
    if (
        isinstance(got_version, bool)
        or not isinstance(got_version, int | str)
        or str(got_version) != str(public_key_version)
    ):
        raise SignatureError(f"publicKeyVersion claim {got_version!r} does not match {public_key_version!r}")
    got_nonce = claims.get("nonce")
    if nonce is not None and got_nonce != nonce:
        raise SignatureError(f"nonce claim {got_nonce!r} does not match {nonce!r}")
    iat = claims.get("iat")
    issued_at = None
    if isinstance(iat, int | float) and not isinstance(iat, bool):
        issued_at = datetime.fromtimestamp(iat, UTC)
    return VerifiedSignature(
        product_code=str(got_code),
        public_key_version=int(got_version),
        nonce=got_nonce if isinstance(got_nonce, str) else None,
        issued_at=issued_at,
        claims=claims,
        token=token,
    )
