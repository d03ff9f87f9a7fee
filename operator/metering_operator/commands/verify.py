"""`metering-operator verify`: check a RegisterUsage signature JWT offline.

Sellers (and the workload itself) can prove a pod's ``marketplace.metering.dev/signature``
annotation was issued by AWS for this product, key version and pod: exit 0 when valid, 1 with
the reason when not, 2 on bad usage (unreadable files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "signature",
        help="the JWT, '-' to read it from stdin, or @FILE to read it from a file",
    )
    parser.add_argument("--product-code", required=True, help="the product code the JWT must name")
    parser.add_argument(
        "--public-key-version", required=True, type=int, help="the public key version the JWT must name"
    )
    parser.add_argument("--nonce", default=None, help="the nonce the JWT must carry (the pod uid)")
    parser.add_argument(
        "--public-key", required=True, type=Path, help="PEM file of the product's RSA public key"
    )


def _read_token(value: str) -> str:
    if value == "-":
        return sys.stdin.read().strip()
    if value.startswith("@"):
        return Path(value[1:]).read_text().strip()
    return value.strip()


def main(args: argparse.Namespace) -> int:
    # Imported here so `metering-operator --help` does not pay for PyJWT/cryptography.
    from metering_operator.domain.signature import SignatureError, verify_signature

    try:
        token = _read_token(args.signature)
        pem = Path(args.public_key).read_bytes()
    except OSError as exc:
        print(f"cannot read input: {exc}", file=sys.stderr)
        return 2
    try:
        verified = verify_signature(
            token,
            pem,
            product_code=args.product_code,
            public_key_version=args.public_key_version,
            nonce=args.nonce,
        )
    except SignatureError as exc:
        print(f"INVALID: {exc}")
        return 1
    issued = verified.issued_at.isoformat() if verified.issued_at else "unknown"
    print(
        f"VALID: productCode={verified.product_code} publicKeyVersion={verified.public_key_version} "
        f"nonce={verified.nonce} issuedAt={issued}"
    )
    return 0
