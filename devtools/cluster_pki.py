"""Certificates and keys for the local control plane, made with the `cryptography` package.

Two small ECDSA P-256 CAs keep the roles apart the way a real cluster does: the *server* CA
signs the API server's serving certificate (clients and pods trust it: it is the cluster's
`ca.crt`), the *client* CA signs the client certificates that authenticate the admin and the
control-plane components (CN = user, O = groups). The service-account signer is RSA 2048 so
tokens are RS256, like the EKS OIDC issuer's, which is what AWS STS sees in production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough that a kept dev cluster never expires under a developer; short enough to be honest.
_VALIDITY = dt.timedelta(days=365)
_SERVING_DNS = ("localhost",)
_SERVING_IPS = ("127.0.0.1", "::1")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class ClientIdentity:
    """A user the client CA vouches for: file stem, user name (CN) and groups (O)."""

    stem: str
    user: str
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pki:
    """Paths of everything written by :func:`write_pki`."""

    server_ca: Path
    client_ca: Path
    client_ca_key: Path
    serving_cert: Path
    serving_key: Path
    sa_key: Path
    sa_pub: Path
    dir: Path

    def client_cert(self, stem: str) -> Path:
        return self.dir / f"{stem}.crt"

    def client_key(self, stem: str) -> Path:
        return self.dir / f"{stem}.key"


def _now() -> dt.datetime:
    # Back-dated a little so a freshly started component never sees "not yet valid".
    return dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, groups: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """Signing only; a CA also signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _ec_key()
    name = _name(cn)
    start = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    san: x509.SubjectAlternativeName | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _ec_key()
    start = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pki(directory: Path, clients: list[ClientIdentity]) -> Pki:
    """Create both CAs, the serving certificate, the SA signer and one cert per client."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = Pki(
        server_ca=directory / "server-ca.crt",
        client_ca=directory / "client-ca.crt",
        client_ca_key=directory / "client-ca.key",
        serving_cert=directory / "apiserver.crt",
        serving_key=directory / "apiserver.key",
        sa_key=directory / "sa.key",
        sa_pub=directory / "sa.pub",
        dir=directory,
    )
    server_ca_key, server_ca = _make_ca("mmo-local-server-ca")
    _write_cert(pki.server_ca, server_ca)
    client_ca_key, client_ca = _make_ca("mmo-local-client-ca")
    _write_cert(pki.client_ca, client_ca)
    _write_key(pki.client_ca_key, client_ca_key)

    san = x509.SubjectAlternativeName(
        [
            *(x509.DNSName(d) for d in _SERVING_DNS),
            *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in _SERVING_IPS),
            # The name in-cluster clients use for the API server.
            x509.DNSName("kubernetes.default.svc"),
        ]
    )
    key, cert = _issue(
        server_ca_key, server_ca, _name("kube-apiserver"), ExtendedKeyUsageOID.SERVER_AUTH, san
    )
    _write_key(pki.serving_key, key)
    _write_cert(pki.serving_cert, cert)

    for ident in clients:
        key, cert = _issue(
            client_ca_key, client_ca, _name(ident.user, ident.groups), ExtendedKeyUsageOID.CLIENT_AUTH
        )
        _write_key(pki.client_key(ident.stem), key)
        _write_cert(pki.client_cert(ident.stem), cert)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki
