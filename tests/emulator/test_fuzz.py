"""Hypothesis throws malformed requests at a real emulator process.

Raw HTTP (http.client), not boto3: junk targets, bodies, headers, paths and methods, both
unsigned and correctly SigV4-signed (so junk reaches the JSON parser, the shape validation
and the operation rules). Whatever arrives, the answer is a 4xx AWS error shape, never a 5xx
(no faults are injected here), and the process keeps running with no traceback in its log.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.emulator.conftest import (
    BUYER,
    CONTRACT_LICENSE,
    CONTRACT_SKU,
    CUSTOM,
    HOURLY,
    LICENSE,
    MARKETPLACE_FINGERPRINT,
    NAMESPACE,
    REGION,
    ROLE,
    STATIC_KEY,
    STATIC_SECRET,
)
from tests.emulator.harness import EmulatorProcess, TestIssuer, web_identity_credentials

METERING_OPERATIONS = ["RegisterUsage", "MeterUsage", "BatchMeterUsage", "ResolveCustomer"]
LICENSE_OPERATIONS = [
    "CheckoutLicense",
    "ExtendLicenseConsumption",
    "CheckInLicense",
    "GetLicense",
    "ListReceivedLicenses",
]
OPERATIONS = METERING_OPERATIONS + LICENSE_OPERATIONS


def target_of(operation: str) -> tuple[str, str, str]:
    """(X-Amz-Target, SigV4 signing name, internal-error code) of an operation."""
    if operation in LICENSE_OPERATIONS:
        return f"AWSLicenseManager.{operation}", "license-manager", "ServerInternalException"
    return f"AWSMPMeteringService.{operation}", "aws-marketplace", "InternalServiceErrorException"


FIELDS = [
    "ProductCode",
    "PublicKeyVersion",
    "Nonce",
    "Timestamp",
    "UsageDimension",
    "UsageQuantity",
    "UsageQuantityAsDecimal",
    "DryRun",
    "UsageAllocations",
    "ClientToken",
    "UsageRecords",
    "RegistrationToken",
    "Dimension",
    "Quantity",
    "QuantityAsDecimal",
    "CustomerIdentifier",
    "CustomerAWSAccountId",
    "LicenseArn",
    "Tags",
    "Key",
    "Value",
    "AllocatedUsageQuantity",
    "AllocatedUsageQuantityAsDecimal",
    "ProductSKU",
    "CheckoutType",
    "KeyFingerprint",
    "Entitlements",
    "Name",
    "Unit",
    "Beneficiary",
    "NodeId",
    "LicenseConsumptionToken",
    "LicenseArns",
    "Filters",
    "Values",
    "NextToken",
    "MaxResults",
    "Version",
]
SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from([CUSTOM, HOURLY, "replicas", "cpu", "1.5", "17", "2031-01-01T00:00:00Z", "", "0"]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.one_of(st.sampled_from(FIELDS), st.text(max_size=10)), children, max_size=6),
    ),
    max_leaves=30,
)
# Bodies close to valid ones: the right field names with arbitrary values.
near_valid = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=8)
bodies = st.one_of(
    near_valid.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    st.just(b"[" * 5000),  # deep nesting
    st.just(b'{"UsageQuantity": NaN}'),
    st.just(b'{"PublicKeyVersion": ' + b"9" * 5000 + b"}"),
)
# Header values as HTTP allows them (visible ASCII and spaces); invalid HTTP has its own test.
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=120)
targets = st.one_of(
    st.sampled_from([target_of(op)[0] for op in OPERATIONS]),
    header_text.map(str.strip),
    st.sampled_from(["AWSMPMeteringService.", "AWSMPMeteringService.Nope", "OtherService.MeterUsage"]),
)


@pytest.fixture(scope="module")
def irsa(emulator: EmulatorProcess, issuer: TestIssuer) -> Credentials:
    creds = web_identity_credentials(
        emulator, ROLE, issuer.token(NAMESPACE, "app", pod_uid="fuzz-pod"), region=REGION
    )
    return Credentials(creds["aws_access_key_id"], creds["aws_secret_access_key"], creds["aws_session_token"])


def send(
    emulator: EmulatorProcess, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def signed_headers(
    emulator: EmulatorProcess, creds: Credentials, target: str, body: bytes, service: str
) -> dict[str, str]:
    request = AWSRequest(
        method="POST",
        url=emulator.url + "/",
        data=body,
        headers={"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"},
    )
    SigV4Auth(creds, service, REGION).add_auth(request)
    return dict(request.headers.items())


def assert_aws_error_shape(status: int, body: bytes) -> None:
    assert status < 500, body[:500]
    if status >= 400:
        text = body.decode()
        if text.startswith("<"):
            assert "<ErrorResponse" in text
            assert "<Code>" in text
        else:
            assert "__type" in json.loads(text), text


@SETTINGS
@given(target=targets, body=bodies, signed_with=st.sampled_from(["static", "irsa", "none"]))
def test_json_protocol_junk(
    emulator: EmulatorProcess, irsa: Credentials, target: str, body: bytes, signed_with: str
) -> None:
    if signed_with == "none":
        headers = {"X-Amz-Target": target, "Content-Type": "application/x-amz-json-1.1"}
    else:
        creds = irsa if signed_with == "irsa" else Credentials(STATIC_KEY, STATIC_SECRET)
        headers = signed_headers(emulator, creds, target, body, "aws-marketplace")
    status, answer = send(emulator, "POST", "/", body, headers)
    assert_aws_error_shape(status, answer)


def _templates() -> dict[str, dict[str, Any]]:
    """A valid request per operation; the mutation strategy below damages parts of it."""
    hour_ago = time.time() - 3600
    return {
        "RegisterUsage": {"ProductCode": HOURLY, "PublicKeyVersion": 1, "Nonce": "fuzz-nonce"},
        "MeterUsage": {
            "ProductCode": CUSTOM,
            "Timestamp": hour_ago,
            "UsageDimension": "replicas",
            "UsageQuantity": 1,
            "UsageAllocations": [{"AllocatedUsageQuantity": 1, "Tags": [{"Key": "team", "Value": "a"}]}],
            "ClientToken": "fuzz-token",
        },
        "BatchMeterUsage": {
            "ProductCode": CUSTOM,
            "UsageRecords": [
                {
                    "Timestamp": hour_ago,
                    "Dimension": "replicas",
                    "Quantity": 1,
                    "CustomerAWSAccountId": BUYER,
                },
                {
                    "Timestamp": hour_ago,
                    "Dimension": "cpu",
                    "QuantityAsDecimal": "1.5",
                    "LicenseArn": LICENSE,
                },
            ],
        },
        "ResolveCustomer": {"RegistrationToken": "config-token-1"},
        "CheckoutLicense": {
            "ProductSKU": CONTRACT_SKU,
            "CheckoutType": "PROVISIONAL",
            "KeyFingerprint": MARKETPLACE_FINGERPRINT,
            "Entitlements": [
                {"Name": "premium", "Unit": "None"},
                {"Name": "seats", "Unit": "Count", "Value": "1"},
            ],
            "ClientToken": "fuzz-client-token",
            "NodeId": "node-1",
        },
        "ExtendLicenseConsumption": {"LicenseConsumptionToken": "0" * 32, "DryRun": True},
        "CheckInLicense": {"LicenseConsumptionToken": "0" * 32, "Beneficiary": "b"},
        "GetLicense": {"LicenseArn": CONTRACT_LICENSE, "Version": "1"},
        "ListReceivedLicenses": {
            "LicenseArns": [CONTRACT_LICENSE],
            "Filters": [{"Name": "ProductSKU", "Values": [CONTRACT_SKU]}],
            "MaxResults": 5,
            "NextToken": "b2Zmc2V0OjA=",
        },
    }


@st.composite
def mutated(draw: st.DrawFn, value: Any) -> Any:
    """Keep, drop (dict members), replace with junk, or recurse into each part of a valid value."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            action = draw(st.sampled_from(["keep", "keep", "drop", "junk", "recurse"]))
            if action == "keep":
                out[key] = item
            elif action == "junk":
                out[key] = draw(json_values)
            elif action == "recurse":
                out[key] = draw(mutated(item))
        if draw(st.booleans()):
            out.update(draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=2)))
        return out
    if isinstance(value, list):
        items = [draw(mutated(v)) for v in value]
        if draw(st.booleans()):
            items = items * draw(st.integers(min_value=0, max_value=30))
        return items
    return draw(st.one_of(st.just(value), json_values))


@SETTINGS
@given(data=st.data(), operation=st.sampled_from(OPERATIONS), signed_with=st.sampled_from(["static", "irsa"]))
def test_signed_mutations_of_valid_requests(
    emulator: EmulatorProcess, irsa: Credentials, data: st.DataObject, operation: str, signed_with: str
) -> None:
    body = json.dumps(data.draw(mutated(_templates()[operation]))).encode()
    creds = irsa if signed_with == "irsa" else Credentials(STATIC_KEY, STATIC_SECRET)
    target, signing_name, _ = target_of(operation)
    headers = signed_headers(emulator, creds, target, body, signing_name)
    status, answer = send(emulator, "POST", "/", body, headers)
    assert_aws_error_shape(status, answer)


@SETTINGS
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=40),
    authorization=header_text,
    amz_date=header_text,
    content_type=st.sampled_from(
        [
            "application/x-amz-json-1.1",
            "application/x-www-form-urlencoded",
            "text/plain",
            "",
            "multipart/form-data",
        ]
    ),
    target=st.one_of(st.none(), targets),
    body=bodies,
)
def test_junk_headers_paths_and_methods(
    emulator: EmulatorProcess,
    method: str,
    path: str,
    authorization: str,
    amz_date: str,
    content_type: str,
    target: str | None,
    body: bytes,
) -> None:
    headers = {"Authorization": authorization, "X-Amz-Date": amz_date, "Content-Type": content_type}
    if target is not None:
        headers["X-Amz-Target"] = target
    quoted = "/" + urllib.parse.quote(path, safe="/?&=")
    if quoted.startswith("/_emulator"):
        quoted = "/x" + quoted  # the admin API is not under test here
    status, answer = send(emulator, method, quoted, body, headers)
    assert_aws_error_shape(status, answer)


@SETTINGS
@given(
    params=st.dictionaries(
        st.sampled_from(
            ["Action", "Version", "RoleArn", "RoleSessionName", "WebIdentityToken", "DurationSeconds"]
        )
        | st.text(max_size=10),
        st.one_of(
            st.text(max_size=60),
            st.sampled_from(
                ["AssumeRoleWithWebIdentity", "GetCallerIdentity", ROLE, "2011-06-15", "900", "x.y.z"]
            ),
        ),
        max_size=6,
    ),
    sign=st.booleans(),
)
def test_sts_query_junk(
    emulator: EmulatorProcess, irsa: Credentials, params: dict[str, str], sign: bool
) -> None:
    body = urllib.parse.urlencode(params).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if sign:
        request = AWSRequest(method="POST", url=emulator.url + "/", data=body, headers=headers)
        SigV4Auth(irsa, "sts", REGION).add_auth(request)
        headers = dict(request.headers.items())
    status, answer = send(emulator, "POST", "/", body, headers)
    assert_aws_error_shape(status, answer)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: \x15\r\nContent-Length: 2\r\n\r\n{}",
        b"GARBAGE\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{}",  # body cut short
    ],
)
def test_invalid_http_is_refused_without_harm(emulator: EmulatorProcess, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", emulator.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer == b"" or re.match(rb"HTTP/1\.[01] 4\d\d ", answer), answer[:200]
    assert emulator.admin.health()["ok"] is True


@pytest.fixture
def injected_errors(emulator: EmulatorProcess) -> Iterator[None]:
    emulator.admin.set_fault("*", error_rate=0.3)
    yield
    emulator.admin.clear_faults()


@SETTINGS
@given(data=st.data(), operation=st.sampled_from(OPERATIONS))
def test_only_injected_faults_answer_5xx(
    emulator: EmulatorProcess, irsa: Credentials, injected_errors: None, data: st.DataObject, operation: str
) -> None:
    body = json.dumps(data.draw(mutated(_templates()[operation]))).encode()
    target, signing_name, internal = target_of(operation)
    headers = signed_headers(emulator, irsa, target, body, signing_name)
    conn = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=30)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        status, answer, request_id = response.status, response.read(), response.getheader("x-amzn-RequestId")
    finally:
        conn.close()
    if status >= 500:
        assert json.loads(answer)["__type"] == internal
        [event] = [e for e in emulator.admin.events(error_code=internal) if e["requestID"] == request_id]
        assert event["injected"] is True
    else:
        assert_aws_error_shape(status, answer)


def test_server_is_alive_after_fuzzing(emulator: EmulatorProcess) -> None:
    assert emulator.alive()
    assert emulator.admin.health()["ok"] is True
    assert not [
        e for e in emulator.admin.events(error_code="InternalServiceErrorException") if not e["injected"]
    ]
    assert not emulator.admin.events(error_code="InternalFailure")


ADMIN_POSTS = [
    "/clock",
    "/faults",
    "/products",
    "/roles",
    "/issuers",
    "/static-credentials",
    "/registration-tokens",
    "/deregistrations",
]
ADMIN_FIELDS = [
    "now",
    "advanceSeconds",
    "real",
    "operation",
    "throttleRate",
    "errorRate",
    "latencyMs",
    "failWith",
    "productCode",
    "publicKeyVersions",
    "dimensions",
    "arn",
    "trust",
    "issuer",
    "jwksFile",
    "accessKeyId",
    "secretAccessKey",
    "customerAWSAccountId",
    "expiresInSeconds",
    "podUid",
]
admin_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 2**63, 0.5]),
)


@SETTINGS
@given(
    path=st.sampled_from(ADMIN_POSTS),
    body=st.one_of(
        st.dictionaries(st.sampled_from(ADMIN_FIELDS), st.one_of(json_values, admin_numbers), max_size=5).map(
            lambda d: json.dumps(d).encode()
        ),
        st.sampled_from([b'{"advanceSeconds": NaN}', b'{"expiresInSeconds": Infinity}', b"[]", b"{"]),
        st.binary(max_size=100),
    ),
    query=st.dictionaries(
        st.sampled_from(["since", "limit", "operation", "productCode"]), st.text(max_size=30)
    ),
)
def test_admin_api_junk_never_breaks_the_emulator(
    emulator: EmulatorProcess, path: str, body: bytes, query: dict[str, str]
) -> None:
    """The admin API is for tests, but a bad call there must not break the AWS side for the rest."""
    try:
        status, answer = send(
            emulator, "POST", "/_emulator" + path, body, {"Content-Type": "application/json"}
        )
        assert status < 500, answer[:300]
        listing = "/_emulator/events?" + urllib.parse.urlencode(query)
        status, answer = send(emulator, "GET", listing, b"", {})
        assert status < 500, answer[:300]
    finally:
        emulator.admin.reset_clock()
        emulator.admin.clear_faults()
    assert emulator.admin.health()["ok"] is True
