"""SigV4 verification of incoming requests.

The expected signature is computed by botocore's own ``SigV4Auth`` on a reconstructed
``AWSRequest`` (same method, path, query, the headers the client listed as signed, body), so
the emulator agrees with every SDK that agrees with botocore, without a hand-written signer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from metering_operator.emulator.errors import AwsError

ALGORITHM = "AWS4-HMAC-SHA256"
_AUTH_RE = re.compile(r"^AWS4-HMAC-SHA256\s+(.*)$", re.DOTALL)
_UNSIGNED = {"UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"}

# Error codes differ between the JSON protocol (Metering) and the query protocol (STS).
CODES = {
    "json": {
        "missing": "MissingAuthenticationTokenException",
        "incomplete": "IncompleteSignatureException",
        "mismatch": "InvalidSignatureException",
        "unknown_key": "UnrecognizedClientException",
        "expired": "ExpiredTokenException",
    },
    "query": {
        "missing": "MissingAuthenticationToken",
        "incomplete": "IncompleteSignature",
        "mismatch": "SignatureDoesNotMatch",
        "unknown_key": "InvalidClientTokenId",
        "expired": "ExpiredToken",
    },
}


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    security_token: str | None


def parse_authorization(headers: Any, dialect: str = "json") -> Authorization:
    """Read the Authorization header; raise the AWS error a client would get for a bad one."""
    codes = CODES[dialect]
    raw = headers.get("Authorization")
    if not raw:
        raise AwsError(codes["missing"], "Missing Authentication Token")
    match = _AUTH_RE.match(raw.strip())
    if not match:
        raise AwsError(
            codes["incomplete"],
            f"Authorization header requires the {ALGORITHM} algorithm "
            "with Credential, SignedHeaders and Signature.",
        )
    parts: dict[str, str] = {}
    for item in match.group(1).split(","):
        key, sep, value = item.strip().partition("=")
        if sep:
            parts[key.strip()] = value.strip()
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if not parts.get(k)]
    if missing:
        raise AwsError(codes["incomplete"], f"Authorization header requires '{missing[0]}' parameter.")
    scope = parts["Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or not all(scope):
        raise AwsError(
            codes["incomplete"],
            "Credential must have exactly 5 slash-delimited elements, "
            "e.g. keyid/date/region/service/aws4_request.",
        )
    amz_date = headers.get("X-Amz-Date", "")
    if not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
        raise AwsError(
            codes["incomplete"], "Authorization header requires existence of a valid 'X-Amz-Date' header."
        )
    if amz_date[:8] != scope[1]:
        raise AwsError(codes["mismatch"], "Date in Credential scope does not match YYYYMMDD from X-Amz-Date.")
    signed = tuple(h.strip().lower() for h in parts["SignedHeaders"].split(";") if h.strip())
    if "host" not in signed:
        raise AwsError(codes["incomplete"], "'Host' must be a signed header.")
    return Authorization(
        access_key_id=scope[0],
        date=scope[1],
        region=scope[2],
        service=scope[3],
        signed_headers=signed,
        signature=parts["Signature"].lower(),
        amz_date=amz_date,
        security_token=headers.get("X-Amz-Security-Token"),
    )


class _ReplaySigner(SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """SigV4Auth that signs exactly the headers the client declared."""

    def __init__(self, credentials: Credentials, service: str, region: str, signed: Iterable[str]) -> None:
        super().__init__(credentials, service, region)
        self._signed = set(signed)

    def headers_to_sign(self, request: AWSRequest) -> HTTPHeaders:
        header_map = HTTPHeaders()
        for name, value in request.headers.items():
            if name.lower() in self._signed:
                header_map[name.lower()] = value
        return header_map


def expected_signature(
    auth: Authorization,
    secret_access_key: str,
    method: str,
    path_qs: str,
    headers: Any,
    body: bytes,
) -> str:
    request = AWSRequest(method=method, url=f"http://{headers.get('Host', '')}{path_qs}", data=body)
    request.headers = HTTPHeaders()
    for name in auth.signed_headers:
        for value in headers.getall(name, []):
            request.headers[name] = value
    request.context["timestamp"] = auth.amz_date
    signer = _ReplaySigner(
        Credentials(auth.access_key_id, secret_access_key, auth.security_token),
        auth.service,
        auth.region,
        auth.signed_headers,
    )
    canonical = signer.canonical_request(request)
    result: str = signer.signature(signer.string_to_sign(request, canonical), request)
    return result


def verify(
    auth: Authorization,
    secret_access_key: str,
    method: str,
    path_qs: str,
    headers: Any,
    body: bytes,
    dialect: str = "json",
) -> None:
    """Raise the signature-mismatch error unless the request was signed with this secret."""
    declared = headers.get("X-Amz-Content-SHA256")
    if declared and declared not in _UNSIGNED and declared.lower() != hashlib.sha256(body).hexdigest():
        raise AwsError(
            CODES[dialect]["mismatch"], "The provided 'x-amz-content-sha256' header does not match."
        )
    want = expected_signature(auth, secret_access_key, method, path_qs, headers, body)
    if not hmac.compare_digest(want, auth.signature):
        raise AwsError(
            CODES[dialect]["mismatch"],
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
