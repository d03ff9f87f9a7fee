"""STS web-identity login against the emulator, through boto3 only.

Tokens come from a local test issuer (JWKS file, or JWKS served over HTTPS with a private CA,
the way the kube-apiserver serves ``/openid/v1/jwks``).
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import ssl
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from devtools.cluster_pki import ClientIdentity, Pki, write_pki

from tests.emulator.conftest import (
    BUYER,
    CUSTOM,
    HOURLY,
    NAMESPACE,
    NO_RETRY,
    REGION,
    ROLE,
    code_of,
    metering,
)
from tests.emulator.harness import EmulatorProcess, TestIssuer, web_identity_credentials


def sts_client(emulator: EmulatorProcess) -> Any:
    return boto3.client(
        "sts",
        endpoint_url=emulator.url,
        region_name=REGION,
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
    )


def assume(emulator: EmulatorProcess, token: str, role: str = ROLE, **kwargs: Any) -> dict[str, Any]:
    result: dict[str, Any] = sts_client(emulator).assume_role_with_web_identity(
        RoleArn=role, RoleSessionName="s-1", WebIdentityToken=token, **kwargs
    )
    return result


def test_assume_role_returns_credentials_bound_to_the_pod(
    emulator: EmulatorProcess, issuer: TestIssuer
) -> None:
    uid = str(uuid.uuid4())
    token = issuer.token(NAMESPACE, "app", pod_name="web-0", pod_uid=uid, trailing_newline=True)
    result = assume(emulator, token)
    creds = result["Credentials"]
    assert creds["AccessKeyId"].startswith("ASIA")
    assert creds["Expiration"] > dt.datetime.now(dt.UTC)
    assert result["AssumedRoleUser"]["Arn"] == f"arn:aws:sts::{BUYER}:assumed-role/metering/s-1"
    assert result["SubjectFromWebIdentityToken"] == f"system:serviceaccount:{NAMESPACE}:app"
    assert result["Audience"] == "sts.amazonaws.com"
    issued = {c["accessKeyId"]: c["identity"] for c in emulator.admin.credentials()}
    identity = issued[creds["AccessKeyId"]]
    assert (identity["podUid"], identity["podName"], identity["serviceAccount"]) == (uid, "web-0", "app")
    assert identity["account"] == BUYER


def test_get_caller_identity_with_issued_credentials(emulator: EmulatorProcess, issuer: TestIssuer) -> None:
    creds = web_identity_credentials(emulator, ROLE, issuer.token(NAMESPACE, "app"), region=REGION)
    sts = boto3.client("sts", endpoint_url=emulator.url, region_name=REGION, config=NO_RETRY, **creds)
    who = sts.get_caller_identity()
    assert who["Account"] == BUYER
    assert who["Arn"].startswith(f"arn:aws:sts::{BUYER}:assumed-role/metering/")
    bad = dict(creds, aws_secret_access_key="wrong-secret")
    sts_bad = boto3.client("sts", endpoint_url=emulator.url, region_name=REGION, config=NO_RETRY, **bad)
    with pytest.raises(ClientError) as exc:
        sts_bad.get_caller_identity()
    assert code_of(exc) == "SignatureDoesNotMatch"


def test_standard_irsa_credential_chain(
    emulator: EmulatorProcess, issuer: TestIssuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """boto3's own AssumeRoleWithWebIdentity provider, configured only by environment (as on EKS)."""
    uid = str(uuid.uuid4())
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token(NAMESPACE, "app", pod_uid=uid) + "\n")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ROLE_ARN", ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    for key, value in emulator.env().items():
        monkeypatch.setenv(key, value)
    client = boto3.Session().client("meteringmarketplace", config=NO_RETRY)
    result = client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1, Nonce=uid)
    assert result["Signature"].count(".") == 2
    regs = [r for r in emulator.admin.registrations(HOURLY) if r["identity"].get("podUid") == uid]
    assert len(regs) == 1


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_issuer", "InvalidIdentityToken"),
        ("wrong_key", "InvalidIdentityToken"),
        ("wrong_audience", "InvalidIdentityToken"),
        ("expired", "ExpiredTokenException"),
        ("untrusted_subject", "AccessDenied"),
        ("unknown_role", "AccessDenied"),
        ("not_a_jwt", "InvalidIdentityToken"),
    ],
)
def test_assume_role_rejections(
    emulator: EmulatorProcess, issuer: TestIssuer, tmp_path: Path, case: str, expected: str
) -> None:
    role = ROLE
    if case == "unknown_issuer":
        token = issuer.token(NAMESPACE, "app", issuer="https://other.example.test")
    elif case == "wrong_key":
        impostor = TestIssuer(tmp_path, issuer=issuer.issuer, kid=issuer.kid)
        token = impostor.token(NAMESPACE, "app")
    elif case == "wrong_audience":
        token = issuer.token(NAMESPACE, "app", audience="someone-else")
    elif case == "expired":
        token = issuer.token(
            NAMESPACE, "app", issued_at=dt.datetime.now(dt.UTC) - dt.timedelta(hours=2), lifetime_seconds=600
        )
    elif case == "untrusted_subject":
        token = issuer.token("other-namespace", "app")
    elif case == "unknown_role":
        token = issuer.token(NAMESPACE, "app")
        role = f"arn:aws:iam::{BUYER}:role/does-not-exist"
    else:
        token = "this-is-not-a-jwt"
    with pytest.raises(ClientError) as exc:
        assume(emulator, token, role)
    assert code_of(exc) == expected
    # The two AccessDenied causes look alike at AWS; the emulator names which one it was.
    hint = {
        "untrusted_subject": "system:serviceaccount:other-namespace:app",
        "unknown_role": "not configured",
    }
    assert hint.get(case, "") in exc.value.response["Error"]["Message"]
    events = emulator.admin.events(operation="AssumeRoleWithWebIdentity", error_code=expected)
    assert events, "the rejection is in the event log"


def test_session_name_and_duration_are_validated(emulator: EmulatorProcess, issuer: TestIssuer) -> None:
    token = issuer.token(NAMESPACE, "app")
    with pytest.raises(ClientError) as exc:
        assume(emulator, token, DurationSeconds=50000)
    assert code_of(exc) == "ValidationError"
    with pytest.raises(ClientError) as exc:
        sts_client(emulator).assume_role_with_web_identity(
            RoleArn=ROLE, RoleSessionName="bad name with spaces", WebIdentityToken=token
        )
    assert code_of(exc) == "ValidationError"


def test_unknown_and_static_keys_and_expired_sessions(emulator: EmulatorProcess, issuer: TestIssuer) -> None:
    unknown = {
        "aws_access_key_id": "ASIAUNKNOWNKEY000001",
        "aws_secret_access_key": "x",
        "aws_session_token": "y",
    }
    client = metering(emulator, unknown)
    with pytest.raises(ClientError) as exc:
        client.meter_usage(
            ProductCode=CUSTOM, Timestamp=dt.datetime.now(dt.UTC), UsageDimension="replicas", UsageQuantity=1
        )
    assert code_of(exc) == "UnrecognizedClientException"
    creds = web_identity_credentials(emulator, ROLE, issuer.token(NAMESPACE, "app"), region=REGION)
    wrong_session = dict(creds, aws_session_token="tampered")
    with pytest.raises(ClientError) as exc:
        metering(emulator, wrong_session).meter_usage(
            ProductCode=CUSTOM, Timestamp=dt.datetime.now(dt.UTC), UsageDimension="replicas", UsageQuantity=1
        )
    assert code_of(exc) == "UnrecognizedClientException"


# -- JWKS over HTTPS with a private CA (what the kube-apiserver does) ---------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """The local cluster's certificate kit: a serving CA and certificate, and a client certificate."""
    return write_pki(tmp_path / "pki", [ClientIdentity("emulator", "emulator")])


class _JwksServer:
    """An HTTPS server serving a JWKS document that the test can change, counting fetches."""

    def __init__(self, pki: Pki, *, require_client_cert: bool = False) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.ca_file = pki.server_ca
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.serving_cert, pki.serving_key)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(pki.client_ca)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/openid/v1/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def jwks_server(pki: Pki) -> Iterator[_JwksServer]:
    server = _JwksServer(pki)
    try:
        yield server
    finally:
        server.close()


def test_jwks_url_with_ca_file_is_cached_and_refetched_for_new_kid(
    emulator: EmulatorProcess, tmp_path: Path, jwks_server: _JwksServer
) -> None:
    iss = f"https://issuer-{uuid.uuid4().hex[:8]}.test"
    first = TestIssuer(tmp_path / "a", issuer=iss, kid="key-a")
    jwks_server.document = {"keys": [first.jwk()]}
    emulator.admin.put_issuer({"issuer": iss, "jwksUrl": jwks_server.url, "caFile": str(jwks_server.ca_file)})
    role = f"arn:aws:iam::{BUYER}:role/url-issuer"
    emulator.admin.put_role(
        {"arn": role, "trust": [{"issuer": iss, "subjects": ["system:serviceaccount:*:app"]}]}
    )
    assume(emulator, first.token("ns1", "app"), role)
    assume(emulator, first.token("ns2", "app"), role)
    assert jwks_server.fetches == 1, "the JWKS is cached between tokens with a known kid"
    second = TestIssuer(tmp_path / "b", issuer=iss, kid="key-b")
    jwks_server.document = {"keys": [first.jwk(), second.jwk()]}
    assume(emulator, second.token("ns1", "app"), role)
    assert jwks_server.fetches == 2, "an unknown kid makes the emulator refetch the JWKS"


def test_jwks_url_without_the_ca_is_an_idp_communication_error(
    emulator: EmulatorProcess, tmp_path: Path, jwks_server: _JwksServer
) -> None:
    iss = f"https://issuer-{uuid.uuid4().hex[:8]}.test"
    issuer = TestIssuer(tmp_path / "c", issuer=iss)
    jwks_server.document = {"keys": [issuer.jwk()]}
    emulator.admin.put_issuer({"issuer": iss, "jwksUrl": jwks_server.url})
    role = f"arn:aws:iam::{BUYER}:role/untrusted-ca"
    emulator.admin.put_role({"arn": role, "trust": [{"issuer": iss}]})
    with pytest.raises(ClientError) as exc:
        assume(emulator, issuer.token("ns", "app"), role)
    assert code_of(exc) == "IDPCommunicationError"


def test_jwks_url_with_client_certificate(emulator: EmulatorProcess, tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.client_cert("emulator"), pki.client_key("emulator")
    server = _JwksServer(pki, require_client_cert=True)
    try:
        iss = f"https://issuer-{uuid.uuid4().hex[:8]}.test"
        issuer = TestIssuer(tmp_path / "d", issuer=iss)
        server.document = {"keys": [issuer.jwk()]}
        role = f"arn:aws:iam::{BUYER}:role/mtls-issuer"
        emulator.admin.put_role({"arn": role, "trust": [{"issuer": iss}]})
        emulator.admin.put_issuer({"issuer": iss, "jwksUrl": server.url, "caFile": str(server.ca_file)})
        with pytest.raises(ClientError) as exc:
            assume(emulator, issuer.token("ns", "app"), role)
        assert code_of(exc) == "IDPCommunicationError", "without a client certificate the fetch fails"
        emulator.admin.put_issuer(
            {
                "issuer": iss,
                "jwksUrl": server.url + "?with-cert",
                "caFile": str(server.ca_file),
                "clientCertFile": str(cert),
                "clientKeyFile": str(key),
            }
        )
        assert assume(emulator, issuer.token("ns", "app"), role)["Credentials"]["AccessKeyId"]
    finally:
        server.close()
