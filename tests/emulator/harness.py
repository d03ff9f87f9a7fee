"""Start the Metering + STS emulator as a real subprocess and talk to its admin API.

Shared by the emulator's own tests and by anyone who needs "AWS" in a test (the client
adapters in ``metering_operator.aws``, e2e tests, benchmarks). The interface is kept stable:

    emu = start_emulator({"region": "eu-west-1", "products": [...]}, tmp_path / "state")
    emu.url, emu.state_dir, emu.region, emu.env()      # endpoints for AWS_ENDPOINT_URL_*
    emu.admin.registrations(), emu.admin.advance_clock(3600), emu.admin.set_fault(...)
    emu.stop()      # SIGTERM and wait;   emu.kill()  # SIGKILL (crash)
    emu2 = emu.restart()   # same config, same state dir, new port (kill=True: crash first)
    with start_emulator(None, state_dir) as emu: ...   # stops on exit

``TestIssuer`` is a local OIDC issuer (RSA key + JWKS file) that mints Kubernetes-style
projected service-account tokens, so the STS web-identity path can be exercised without a
cluster. The emulator process is real and boto3 talks to it over HTTP: nothing is stubbed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from devtools.stack import AdminError as AdminError
from devtools.stack import admin_request, all_events

REPO_ROOT = Path(__file__).resolve().parents[2]
LISTENING_PREFIX = "emulator listening on "
WEB_IDENTITY_AUDIENCE = "sts.amazonaws.com"


class AdminClient:
    """A small typed client for the emulator's ``/_emulator/`` JSON API (see docs/emulator.md)."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.base = url.rstrip("/") + "/_emulator"
        self.timeout = timeout

    # -- transport -------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        return admin_request(self.base, method, path, body, query, self.timeout)

    def get(self, path: str, **query: str) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body if body is not None else {})

    # -- read models -----------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/health")
        return result

    def registrations(self, product_code: str | None = None) -> list[dict[str, Any]]:
        return list(self.get("/registrations", **_q(productCode=product_code))["registrations"])

    def meter_records(self, product_code: str | None = None) -> list[dict[str, Any]]:
        """MeterUsage records (one per product, calling pod, dimension and hour)."""
        return list(self.get("/meter-records", **_q(productCode=product_code))["records"])

    def batch_records(self, product_code: str | None = None) -> list[dict[str, Any]]:
        """BatchMeterUsage records (one per product, customer, dimension and hour)."""
        return list(self.get("/batch-records", **_q(productCode=product_code))["records"])

    def billing(self, product_code: str | None = None) -> dict[str, Any]:
        """What AWS would bill: ``{"pods": [...], "dimensions": [...], "now": ...}``."""
        result: dict[str, Any] = self.get("/billing", **_q(productCode=product_code))
        return result

    def events(self, operation: str | None = None, error_code: str | None = None) -> list[dict[str, Any]]:
        """CloudTrail-style log of every call, oldest first."""
        return all_events(self.base, operation, error_code, self.timeout)

    def credentials(self) -> list[dict[str, Any]]:
        """Temporary credentials issued by AssumeRoleWithWebIdentity, with the caller identity."""
        return list(self.get("/credentials")["credentials"])

    def config(self) -> dict[str, Any]:
        """The effective configuration (file + runtime additions)."""
        result: dict[str, Any] = self.get("/config")
        return result

    def public_key_pem(self, product_code: str, version: int) -> str:
        """The PEM public key the emulator signs RegisterUsage JWTs for this product/version with."""
        path = f"/products/{urllib.parse.quote(product_code, safe='')}/keys/{version}.pem"
        return str(self.get(path))

    # -- clock -----------------------------------------------------------------------------
    def clock(self) -> datetime:
        return datetime.fromisoformat(self.get("/clock")["now"])

    def set_clock(self, now: datetime) -> datetime:
        if now.tzinfo is None:
            raise ValueError("set_clock needs an aware (UTC) datetime")
        return datetime.fromisoformat(self.post("/clock", {"now": now.isoformat()})["now"])

    def advance_clock(self, seconds: float) -> datetime:
        return datetime.fromisoformat(self.post("/clock", {"advanceSeconds": seconds})["now"])

    def reset_clock(self) -> datetime:
        """Back to real UTC time."""
        return datetime.fromisoformat(self.post("/clock", {"real": True})["now"])

    # -- faults ----------------------------------------------------------------------------
    def set_fault(
        self,
        operation: str,
        *,
        throttle_rate: float = 0.0,
        error_rate: float = 0.0,
        latency_ms: int = 0,
        fail_with: str | None = None,
        fail_all: bool = False,
        unprocessed_rate: float = 0.0,
        product_codes: tuple[str, ...] = (),
        answer_latency_ms: int = 0,
    ) -> dict[str, Any]:
        """Inject faults for one operation (``"*"`` = all operations without their own entry).

        ``fail_with``: an error code every call answers; ``fail_all``: every call is an internal
        error (an outage); ``unprocessed_rate``: BatchMeterUsage records left unprocessed;
        ``product_codes``: only calls for these products are hit (metering operations).
        ``answer_latency_ms``: the answer is held back after the call was processed and recorded.
        """
        body = {
            "operation": operation,
            "throttleRate": throttle_rate,
            "errorRate": error_rate,
            "latencyMs": latency_ms,
            "failWith": fail_with,
            "failAll": fail_all,
            "unprocessedRate": unprocessed_rate,
            "productCodes": list(product_codes),
            "answerLatencyMs": answer_latency_ms,
        }
        result: dict[str, Any] = self.post("/faults", body)
        return result

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/faults")
        return result

    def clear_faults(self) -> None:
        self.request("DELETE", "/faults")

    # -- runtime configuration -------------------------------------------------------------
    def put_product(self, product: dict[str, Any]) -> dict[str, Any]:
        """Add or replace a product (same shape as a config file ``products`` entry)."""
        result: dict[str, Any] = self.post("/products", product)
        return result

    def put_role(self, role: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/roles", role)
        return result

    def put_issuer(self, issuer: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/issuers", issuer)
        return result

    def put_static_credentials(self, creds: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = self.post("/static-credentials", creds)
        return result

    def reload_config(self) -> dict[str, Any]:
        """Re-read the config file (runtime additions are kept on top of it)."""
        result: dict[str, Any] = self.post("/config/reload")
        return result

    def mint_registration_token(
        self,
        product_code: str,
        customer_aws_account_id: str,
        *,
        customer_identifier: str | None = None,
        license_arn: str | None = None,
        expires_in_seconds: int = 3600,
    ) -> str:
        body = {
            "productCode": product_code,
            "customerAWSAccountId": customer_aws_account_id,
            "customerIdentifier": customer_identifier,
            "licenseArn": license_arn,
            "expiresInSeconds": expires_in_seconds,
        }
        return str(self.post("/registration-tokens", body)["token"])

    # -- License Manager -------------------------------------------------------------------
    def put_license(self, license_entry: dict[str, Any]) -> dict[str, Any]:
        """Add or replace a license (same shape as a config file ``licenses`` entry)."""
        result: dict[str, Any] = self.post("/licenses", license_entry)
        return result

    def license_checkouts(self, license_arn: str | None = None) -> list[dict[str, Any]]:
        """Every CheckoutLicense with its state now (Active, CheckedIn, Expired)."""
        return list(self.get("/license-checkouts", **_q(licenseArn=license_arn))["checkouts"])

    def seat_usage(self, license_arn: str | None = None) -> list[dict[str, Any]]:
        """The billing view's ``licenses``: per license and entitlement, what is in use now."""
        return list(self.get("/billing", **_q(licenseArn=license_arn))["licenses"])

    def license_issuer_key_pem(self, key_fingerprint: str) -> str:
        """The PEM public key the emulator signs this issuer's SignedTokens with."""
        return str(self.get(f"/license-issuers/{urllib.parse.quote(key_fingerprint, safe='')}/key.pem"))

    def deregister(self, pod_uid: str, product_code: str | None = None) -> dict[str, Any]:
        """Tell the emulator a pod was deleted: its per-pod billing stops at the emulator's now."""
        result: dict[str, Any] = self.post(
            "/deregistrations", {"podUid": pod_uid, "productCode": product_code}
        )
        return result


def _q(**kwargs: str | None) -> dict[str, str]:
    return {k: v for k, v in kwargs.items() if v is not None}


@dataclass
class EmulatorProcess:
    url: str
    state_dir: Path
    config_path: Path | None
    process: subprocess.Popen[bytes]
    log_path: Path
    region: str | None
    admin: AdminClient = field(init=False)

    def __post_init__(self) -> None:
        self.admin = AdminClient(self.url)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def env(self, region: str | None = None) -> dict[str, str]:
        """Environment variables that point unmodified boto3 at this emulator."""
        env = {
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": self.url,
            "AWS_ENDPOINT_URL_LICENSE_MANAGER": self.url,
            "AWS_ENDPOINT_URL_STS": self.url,
        }
        chosen = region or self.region
        if chosen:
            env["AWS_DEFAULT_REGION"] = chosen
            env["AWS_REGION"] = chosen
        return env

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        return int(self.process.returncode)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def __enter__(self) -> EmulatorProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def restart(self, *, kill: bool = False) -> EmulatorProcess:
        """Stop (or crash) this process and start a new one on the same config and state dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return start_emulator(self.config_path, self.state_dir)


def start_emulator(
    config: dict[str, Any] | Path | None,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 30.0,
) -> EmulatorProcess:
    """Run ``metering-operator emulator`` and wait until it prints its URL.

    ``config`` may be a dict (written as YAML next to the state dir), a path to a YAML file,
    or None (empty configuration).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path: Path | None
    region: str | None = None
    if isinstance(config, dict):
        config_path = state_dir.parent / f"{state_dir.name}-config.yaml"
        # Through JSON first so Paths and datetimes in the dict become plain strings.
        plain = json.loads(json.dumps(config, default=str))
        config_path.write_text(yaml.safe_dump(plain, sort_keys=False))
        region = config.get("region")
    elif config is not None:
        config_path = Path(config)
        loaded = yaml.safe_load(config_path.read_text()) or {}
        region = loaded.get("region") if isinstance(loaded, dict) else None
    else:
        config_path = None
    log_path = state_dir.parent / f"{state_dir.name}-emulator.log"
    cmd = [
        sys.executable,
        "-m",
        "metering_operator.cli",
        "emulator",
        "--host",
        host,
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
    ]
    if config_path is not None:
        cmd += ["--config", str(config_path)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO_ROOT / "operator"), env.get("PYTHONPATH", "")] if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    log_file = log_path.open("ab")
    try:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    finally:
        log_file.close()
    deadline = time.monotonic() + timeout
    while True:
        text = log_path.read_bytes()[start_offset:].decode(errors="replace")
        for line in text.splitlines():
            if line.startswith(LISTENING_PREFIX):
                url = line[len(LISTENING_PREFIX) :].strip()
                return EmulatorProcess(url, state_dir, config_path, process, log_path, region)
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited with {process.returncode}:\n{text}")
        if time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"emulator did not start within {timeout}s:\n{text}")
        time.sleep(0.05)


class TestIssuer:
    """A local OIDC issuer: RSA key, JWKS file, and Kubernetes-style service-account tokens."""

    __test__ = False  # not a pytest test class

    def __init__(
        self, directory: Path, issuer: str = "https://issuer.test.local", kid: str | None = None
    ) -> None:
        self.issuer = issuer
        self.kid = kid or uuid.uuid4().hex[:16]
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_path = directory / f"jwks-{self.kid}.json"
        self.write_jwks()

    def jwk(self) -> dict[str, Any]:
        jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk

    def write_jwks(self) -> None:
        self.jwks_path.write_text(json.dumps({"keys": [self.jwk()]}))

    def issuer_config(self) -> dict[str, Any]:
        """An ``issuers`` entry for the emulator config."""
        return {"issuer": self.issuer, "jwksFile": str(self.jwks_path)}

    def token(
        self,
        namespace: str = "default",
        service_account: str = "default",
        *,
        pod_name: str | None = "pod-1",
        pod_uid: str | None = None,
        audience: str | list[str] = WEB_IDENTITY_AUDIENCE,
        lifetime_seconds: int = 3600,
        issued_at: datetime | None = None,
        issuer: str | None = None,
        subject: str | None = None,
        trailing_newline: bool = False,
    ) -> str:
        """A projected service-account token bound to a pod (as TokenRequest would mint it)."""
        iat = int((issued_at or datetime.now(UTC)).timestamp())
        k8s: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {
                "name": service_account,
                "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, service_account)),
            },
        }
        if pod_name is not None:
            k8s["pod"] = {"name": pod_name, "uid": pod_uid or str(uuid.uuid4())}
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject or f"system:serviceaccount:{namespace}:{service_account}",
            "aud": audience,
            "iat": iat,
            "nbf": iat,
            "exp": iat + lifetime_seconds,
            "kubernetes.io": k8s,
        }
        token = jwt.encode(claims, self._key, algorithm="RS256", headers={"kid": self.kid})
        return token + ("\n" if trailing_newline else "")


def web_identity_credentials(
    emulator: EmulatorProcess,
    role_arn: str,
    token: str,
    session_name: str = "test-session",
    region: str | None = None,
) -> dict[str, str]:
    """Exchange a token with the emulator's STS through boto3; returns boto3 client kwargs."""
    import boto3  # local import: harness users that only need the process should not pay for boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    chosen = region or emulator.region
    if not chosen:
        raise ValueError("no region: pass region= or configure one in the emulator config")
    sts = boto3.client(
        "sts",
        endpoint_url=emulator.url,
        region_name=chosen,
        config=Config(signature_version=UNSIGNED),
    )
    creds = sts.assume_role_with_web_identity(
        RoleArn=role_arn, RoleSessionName=session_name, WebIdentityToken=token
    )["Credentials"]
    return {
        "aws_access_key_id": creds["AccessKeyId"],
        "aws_secret_access_key": creds["SecretAccessKey"],
        "aws_session_token": creds["SessionToken"],
    }
