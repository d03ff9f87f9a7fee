"""STS (query protocol): AssumeRoleWithWebIdentity and GetCallerIdentity.

AssumeRoleWithWebIdentity verifies the token like AWS does for an IRSA OIDC provider:
signature against the issuer's JWKS (fetched from a URL, e.g. the kube-apiserver's
``/openid/v1/jwks`` with its own CA, or read from a file), issuer, audience, expiry; then the
role's trust (issuer + allowed ``sub`` globs). The credentials it issues are remembered with
the caller's identity, including the pod from the token's ``kubernetes.io`` claim.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import ssl
import string
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
import jwt

from metering_operator.emulator.config import EmulatorConfig, Issuer
from metering_operator.emulator.errors import STS_NAMESPACE, AwsError
from metering_operator.emulator.state import State

ALLOWED_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
SESSION_NAME_RE = re.compile(r"^[\w+=,.@-]{2,64}$")
# A kid still unknown after a refetch is not refetched again for this long (protects the issuer
# from a flood of tokens with made-up kids, while a rotated-in key is picked up at once).
_NEGATIVE_CACHE_SECONDS = 5.0


class JwksResolver:
    """Signing keys per issuer; URL-served JWKS are cached and refetched on an unknown kid."""

    def __init__(self) -> None:
        self._cache: dict[str, list[dict[str, Any]]] = {}
        self._missing: dict[tuple[str, str | None], float] = {}

    async def keys(self, issuer: Issuer, kid: str | None) -> list[Any]:
        jwks = await self._jwks(issuer, kid)
        candidates = [k for k in jwks if kid is None or k.get("kid") in (None, kid)]
        if not candidates:
            raise AwsError(
                "InvalidIdentityToken", f"No signing key with kid {kid!r} found for issuer {issuer.issuer}"
            )
        keys = []
        for jwk in candidates:
            try:
                keys.append(jwt.PyJWK(jwk).key)
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
                continue  # a key type PyJWT cannot use is simply not a candidate
        if not keys:
            raise AwsError("InvalidIdentityToken", f"No usable signing key found for issuer {issuer.issuer}")
        return keys

    async def _jwks(self, issuer: Issuer, kid: str | None) -> list[dict[str, Any]]:
        if issuer.jwks_file is not None:
            # Read every time: it is a small local file, and tests rotate keys by rewriting it.
            try:
                return _parse_jwks(issuer.jwks_file.read_bytes())
            except OSError as exc:
                raise AwsError(
                    "IDPCommunicationError", f"Cannot read JWKS for {issuer.issuer}: {exc.strerror}"
                ) from None
        assert issuer.jwks_url is not None
        # Keyed by URL too, so re-pointing an issuer (admin API, reload) never serves stale keys.
        cache_key = f"{issuer.issuer} {issuer.jwks_url}"
        cached = self._cache.get(cache_key)
        now = time.monotonic()
        if cached is not None:
            known = kid is None or any(k.get("kid") == kid for k in cached)
            recently_missing = now - self._missing.get((cache_key, kid), -1e9) < _NEGATIVE_CACHE_SECONDS
            if known or recently_missing:
                return cached
        keys = await self._fetch(issuer)
        self._cache[cache_key] = keys
        if kid is not None and not any(k.get("kid") == kid for k in keys):
            if len(self._missing) > 10_000:
                self._missing.clear()
            self._missing[(cache_key, kid)] = now
        return keys

    async def _fetch(self, issuer: Issuer) -> list[dict[str, Any]]:
        assert issuer.jwks_url is not None
        try:
            ssl_arg = _ssl_context(issuer)
            headers = {}
            if issuer.bearer_token_file is not None:
                headers["Authorization"] = "Bearer " + issuer.bearer_token_file.read_text().strip()
            timeout = aiohttp.ClientTimeout(total=10)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(issuer.jwks_url, ssl=ssl_arg, headers=headers) as resp,
            ):
                if resp.status != 200:
                    raise AwsError(
                        "IDPCommunicationError",
                        f"JWKS endpoint of {issuer.issuer} answered HTTP {resp.status}",
                    )
                return _parse_jwks(await resp.read())
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            raise AwsError("IDPCommunicationError", f"Cannot fetch JWKS of {issuer.issuer}: {exc}") from None


def _ssl_context(issuer: Issuer) -> ssl.SSLContext | bool:
    if issuer.insecure_skip_verify and issuer.client_cert_file is None:
        return False
    context = ssl.create_default_context(cafile=str(issuer.ca_file) if issuer.ca_file else None)
    if issuer.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if issuer.client_cert_file is not None:
        context.load_cert_chain(
            str(issuer.client_cert_file), str(issuer.client_key_file) if issuer.client_key_file else None
        )
    return context


def _parse_jwks(raw: bytes) -> list[dict[str, Any]]:
    try:
        data = json.loads(raw)
    except ValueError:
        raise AwsError("IDPCommunicationError", "The issuer's JWKS is not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list):
        raise AwsError("IDPCommunicationError", "The issuer's JWKS has no 'keys' list")
    return [k for k in keys if isinstance(k, dict)]


def _expiry(exp: Any) -> str:
    """A token's ``exp`` for a message; an absurd value (only its issuer can sign one) as it is."""
    try:
        return f"{datetime.fromtimestamp(float(exp), UTC):%Y-%m-%dT%H:%M:%SZ}"
    except (TypeError, ValueError, OverflowError, OSError):
        return repr(exp)


async def verify_web_identity(
    config: EmulatorConfig, resolver: JwksResolver, raw_token: str
) -> dict[str, Any]:
    """Return the verified claims, or raise the STS error AWS gives for this token."""
    # Token files end with a newline and botocore sends it along; AWS does not mind.
    token = raw_token.strip()
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise AwsError("InvalidIdentityToken", "The web identity token is not a valid JWT.") from None
    iss = unverified.get("iss")
    if not isinstance(iss, str):
        raise AwsError("InvalidIdentityToken", "The web identity token has no 'iss' claim.")
    issuer = config.issuer(iss)
    if issuer is None:
        raise AwsError("InvalidIdentityToken", f"No OpenIDConnect provider found in your account for {iss}")
    alg = header.get("alg")
    if alg not in ALLOWED_ALGORITHMS:
        raise AwsError("InvalidIdentityToken", f"Unsupported token signing algorithm {alg!r}.")
    kid = header.get("kid") if isinstance(header.get("kid"), str) else None
    claims: dict[str, Any] | None = None
    for key in await resolver.keys(issuer, kid):
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options={"verify_aud": False, "require": ["exp", "sub", "iss"]},
                issuer=issuer.issuer,
            )
            break
        except jwt.ExpiredSignatureError:
            raise AwsError(
                "ExpiredTokenException",
                f"Token expired: current date/time {datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} "
                f"must be before the expiration date/time {_expiry(unverified.get('exp'))}",
            ) from None
        except jwt.InvalidSignatureError:
            continue
        except jwt.PyJWTError as exc:
            raise AwsError("InvalidIdentityToken", f"The web identity token is invalid: {exc}") from None
    if claims is None:
        raise AwsError("InvalidIdentityToken", "The web identity token's signature could not be verified.")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
    if not any(a in issuer.audiences for a in audiences):
        raise AwsError("InvalidIdentityToken", "Incorrect token audience")
    return claims


async def assume_role_with_web_identity(
    config: EmulatorConfig, state: State, resolver: JwksResolver, params: dict[str, str]
) -> tuple[dict[str, Any], str]:
    """Returns (identity for the event log, XML body)."""
    missing = [p for p in ("RoleArn", "RoleSessionName", "WebIdentityToken") if not params.get(p)]
    if missing:
        raise AwsError("MissingParameter", f"The request must contain the parameter {missing[0]}")
    session_name = params["RoleSessionName"]
    if not SESSION_NAME_RE.match(session_name):
        raise AwsError(
            "ValidationError",
            "1 validation error detected: Value at 'roleSessionName' failed to satisfy constraint: "
            r"Member must satisfy regular expression pattern: [\w+=,.@-]* and length 2..64",
        )
    duration = 3600
    if "DurationSeconds" in params:
        try:
            duration = int(params["DurationSeconds"])
        except ValueError:
            raise AwsError("ValidationError", "DurationSeconds must be an integer") from None
        if not 900 <= duration <= 43200:
            raise AwsError(
                "ValidationError",
                "1 validation error detected: Value at 'durationSeconds' failed to satisfy constraint: "
                "Member must have value between 900 and 43200",
            )
    claims = await verify_web_identity(config, resolver, params["WebIdentityToken"])
    role = config.role(params["RoleArn"])
    sub = str(claims["sub"])
    # AWS's message is the same for both causes; the emulator adds which one, since finding it
    # out is the whole point of testing an IRSA setup locally.
    denied = "Not authorized to perform sts:AssumeRoleWithWebIdentity"
    if role is None:
        raise AwsError("AccessDenied", f"{denied} (emulator: role {params['RoleArn']} is not configured)")
    trusted = any(
        t.issuer == claims["iss"] and any(fnmatch.fnmatchcase(sub, p) for p in t.subjects) for t in role.trust
    )
    if not trusted:
        raise AwsError(
            "AccessDenied",
            f"{denied} (emulator: no trust statement of role {role.arn} allows issuer {claims['iss']} "
            f"and subject {sub})",
        )
    if duration > role.max_session_seconds:
        raise AwsError(
            "ValidationError",
            "The requested DurationSeconds exceeds the MaxSessionDuration set for this role "
            f"({role.max_session_seconds}).",
        )
    k8s = claims.get("kubernetes.io") if isinstance(claims.get("kubernetes.io"), dict) else {}
    assert isinstance(k8s, dict)
    pod = k8s.get("pod") if isinstance(k8s.get("pod"), dict) else {}
    sa = k8s.get("serviceaccount") if isinstance(k8s.get("serviceaccount"), dict) else {}
    assert isinstance(pod, dict)
    assert isinstance(sa, dict)
    role_name = role.arn.rsplit("/", 1)[1]
    role_id = "AROA" + base64.b32encode(hashlib.sha256(role.arn.encode()).digest()).decode()[:17]
    access_key_id = "ASIA" + "".join(
        secrets.choice(string.ascii_uppercase + string.digits) for _ in range(16)
    )
    secret = secrets.token_urlsafe(30)[:40]
    session_token = base64.b64encode(secrets.token_bytes(180)).decode()
    expiration = time.time() + duration
    aud = claims.get("aud")
    audience = aud if isinstance(aud, str) else (aud[0] if isinstance(aud, list) and aud else "")
    identity = {
        "arn": f"arn:aws:sts::{role.account}:assumed-role/{role_name}/{session_name}",
        "assumedRoleId": f"{role_id}:{session_name}",
        "account": role.account,
        "roleArn": role.arn,
        "sessionName": session_name,
        "issuer": claims["iss"],
        "subject": sub,
        "audience": audience,
        "namespace": k8s.get("namespace"),
        "serviceAccount": sa.get("name"),
        "podName": pod.get("name"),
        "podUid": pod.get("uid"),
    }
    state.add_credentials(access_key_id, secret, session_token, expiration, identity)
    expires = datetime.fromtimestamp(expiration, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    body = _response(
        "AssumeRoleWithWebIdentity",
        f"<SubjectFromWebIdentityToken>{escape(sub)}</SubjectFromWebIdentityToken>"
        f"<Audience>{escape(audience)}</Audience>"
        f"<AssumedRoleUser><Arn>{escape(identity['arn'])}</Arn>"
        f"<AssumedRoleId>{escape(identity['assumedRoleId'])}</AssumedRoleId></AssumedRoleUser>"
        f"<Credentials><AccessKeyId>{access_key_id}</AccessKeyId><SecretAccessKey>{secret}</SecretAccessKey>"
        f"<SessionToken>{session_token}</SessionToken><Expiration>{expires}</Expiration></Credentials>"
        f"<Provider>{escape(str(claims['iss']))}</Provider>",
    )
    return {**identity, "accessKeyId": access_key_id}, body


def get_caller_identity(user_id: str, account: str, arn: str) -> str:
    return _response(
        "GetCallerIdentity",
        f"<UserId>{escape(user_id)}</UserId><Account>{escape(account)}</Account><Arn>{escape(arn)}</Arn>",
    )


def _response(action: str, result: str) -> str:
    return (
        f'<{action}Response xmlns="{STS_NAMESPACE}"><{action}Result>{result}</{action}Result>'
        f"<ResponseMetadata><RequestId>{uuid.uuid4()}</RequestId></ResponseMetadata></{action}Response>"
    )
