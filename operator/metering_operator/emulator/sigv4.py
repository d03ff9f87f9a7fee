"""SigV4 verification of incoming requests.

The expected signature is computed by botocore's own ``SigV4Auth`` on a reconstructed
``AWSRequest`` (same method, path, query, the headers the client listed as signed, body), so
the emulator agrees with every SDK that agrees with botocore, without a hand-written signer.

Like AWS, a signature is only good for 15 minutes either side of its ``X-Amz-Date``, judged by
the wall clock (never the settable business clock: callers sign with real time), so a replayed
request or a caller with a wrong clock is refused the way AWS refuses it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from metering_operator.emulator.errors import AwsError

ALGORITHM = "AWS4-HMAC-SHA256"
_AUTH_RE = re.compile(r"^AWS4-HMAC-SHA256\s+(.*)$", re.DOTALL)
_UNSIGNED = {"UNSIGNED-PAYLOAD", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"}
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_SKEW = timedelta(minutes=15)

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
class IncomingRequest:
    """The parts of an HTTP request that its SigV4 signature covers."""

    method: str
    path_qs: str
    headers: Any  # a multidict: aiohttp's CIMultiDictProxy
    body: bytes


@dataclass(frozen=True)
class Authorization:
    access_key_id: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    signed_at: datetime
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
    try:
        signed_at = datetime.strptime(amz_date, AMZ_DATE_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise AwsError(
            codes["incomplete"], "Authorization header requires existence of a valid 'X-Amz-Date' header."
        ) from None
    if amz_date[:8] != scope[1]:
        raise AwsError(codes["mismatch"], "Date in Credential scope does not match YYYYMMDD from X-Amz-Date.")
    signed = tuple(h.strip().lower() for h in parts["SignedHeaders"].split(";") if h.strip())
    if "host" not in signed:
        raise AwsError(codes["incomplete"], "'Host' must be a signed header.")
    return Authorization(
        access_key_id=scope[0],
        region=scope[2],
        service=scope[3],
        signed_headers=signed,
        signature=parts["Signature"].lower(),
        amz_date=amz_date,
        signed_at=signed_at,
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


def expected_signature(auth: Authorization, secret_access_key: str, incoming: IncomingRequest) -> str:
    headers = incoming.headers
    request = AWSRequest(
        method=incoming.method, url=f"http://{headers.get('Host', '')}{incoming.path_qs}", data=incoming.body
    )
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


def check_freshness(auth: Authorization, dialect: str = "json", now: datetime | None = None) -> None:
    """Raise AWS's signature-expired error unless X-Amz-Date is within 15 minutes of ``now``."""
    now = now or datetime.now(UTC)
    code = CODES[dialect]["mismatch"]
    stamp = auth.signed_at.strftime(AMZ_DATE_FORMAT)
    if auth.signed_at < now - MAX_SKEW:
        earliest = (now - MAX_SKEW).strftime(AMZ_DATE_FORMAT)
        raise AwsError(
            code,
            f"Signature expired: {stamp} is now earlier than {earliest} "
            f"({now.strftime(AMZ_DATE_FORMAT)} - 15 min.)",
        )
    if auth.signed_at > now + MAX_SKEW:
        latest = (now + MAX_SKEW).strftime(AMZ_DATE_FORMAT)
        raise AwsError(
            code,
            f"Signature not yet current: {stamp} is still later than {latest} "
            f"({now.strftime(AMZ_DATE_FORMAT)} + 15 min.)",
        )


def verify(
    auth: Authorization, secret_access_key: str, incoming: IncomingRequest, dialect: str = "json"
) -> None:
    """Raise the signature-mismatch error unless the request was signed with this secret."""
    declared = incoming.headers.get("X-Amz-Content-SHA256")
    if (
        declared
        and declared not in _UNSIGNED
        and declared.lower() != hashlib.sha256(incoming.body).hexdigest()
    ):
        raise AwsError(
            CODES[dialect]["mismatch"], "The provided 'x-amz-content-sha256' header does not match."
        )
    want = expected_signature(auth, secret_access_key, incoming)
    if not hmac.compare_digest(want, auth.signature):
        raise AwsError(
            CODES[dialect]["mismatch"],
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method.",
        )
