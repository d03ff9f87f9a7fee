"""RSA key pairs, kept in ``<state-dir>/keys``: per product and key version, and per license issuer.

AWS hands a seller one public key per product and version; the emulator plays AWS, so it
generates the private half on first use and exports the public half as PEM next to it
(``<quoted product code>.v<version>.pub.pem``) for the operator's configuration. License Manager
signs checkouts with its issuer's key (for Marketplace contracts, AWS Marketplace's, named by the
key fingerprint); the emulator keeps one pair per fingerprint
(``issuer-<quoted fingerprint>.pub.pem``), whose public half the operator is given.
"""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


class KeyStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._cache: dict[str, rsa.RSAPrivateKey] = {}

    def _path(self, stem: str, kind: str) -> Path:
        return self.directory / f"{stem}.{kind}.pem"

    @staticmethod
    def _product_stem(product_code: str, version: int) -> str:
        # Product codes may hold '/', ':' and '=': quote them into a safe file name.
        return f"{urllib.parse.quote(product_code, safe='')}.v{version}"

    @staticmethod
    def _issuer_stem(fingerprint: str) -> str:
        return f"issuer-{urllib.parse.quote(fingerprint, safe='')}"

    def public_key_path(self, product_code: str, version: int) -> Path:
        return self._path(self._product_stem(product_code, version), "pub")

    def private_key(self, product_code: str, version: int) -> rsa.RSAPrivateKey:
        return self._key(self._product_stem(product_code, version))

    def issuer_private_key(self, fingerprint: str) -> rsa.RSAPrivateKey:
        """The key License Manager signs checkouts of this issuer's licenses with."""
        return self._key(self._issuer_stem(fingerprint))

    def issuer_public_key_pem(self, fingerprint: str) -> str:
        self.issuer_private_key(fingerprint)
        return self._path(self._issuer_stem(fingerprint), "pub").read_text()

    def _key(self, stem: str) -> rsa.RSAPrivateKey:
        cached = self._cache.get(stem)
        if cached is not None:
            return cached
        key_path = self._path(stem, "key")
        if key_path.exists():
            loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(loaded, rsa.RSAPrivateKey):
                raise ValueError(f"{key_path} is not an RSA private key")
            key = loaded
        else:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            tmp = key_path.with_suffix(".tmp")
            tmp.write_bytes(pem)
            os.chmod(tmp, 0o600)
            tmp.replace(key_path)
        pub_path = self._path(stem, "pub")
        if not pub_path.exists():
            pub_path.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        self._cache[stem] = key
        return key

    def public_key_pem(self, product_code: str, version: int) -> str:
        self.private_key(product_code, version)
        return self.public_key_path(product_code, version).read_text()
