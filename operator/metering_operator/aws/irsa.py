"""Per-pod IRSA credentials: a pod's web-identity token in, that pod's temporary AWS credentials out.

RegisterUsage must be signed by the pod being registered (AWS tells pods apart through their
web-identity session and rejects node roles or static keys with ``PlatformNotSupportedException``).
The operator therefore does what the pod's own SDK would do with its projected token: it mints a
token for the pod's service account bound to the pod (TokenRequest, audience ``sts.amazonaws.com``,
done in :mod:`metering_operator.kube`) and exchanges it here with STS
``AssumeRoleWithWebIdentity`` for the role in the service account's ``eks.amazonaws.com/role-arn``
annotation.

The STS call is unsigned (the token is the proof), so the STS client never runs the credential
chain. Region and endpoint are honoured like any boto3 client, including ``AWS_ENDPOINT_URL_STS``.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config

from metering_operator.aws import errors
from metering_operator.aws.client import MeteringClient, MeteringClientFactory, call_aws, client_config
from metering_operator.aws.region import require_region
from metering_operator.aws.sessions import new_session
from metering_operator.domain.clock import Clock, ensure_utc

ROLE_ARN_ANNOTATION = "eks.amazonaws.com/role-arn"
# The IAM role ARN form IRSA annotations carry (partition aws, aws-cn, aws-us-gov, ...).
_ROLE_ARN_RE = re.compile(r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[\w+=,.@/-]{1,512}$")
# RoleSessionName: 2..64 chars of [\w+=,.@-] (STS model).
_SESSION_NAME_RE = re.compile(r"^[\w+=,.@-]{2,64}$")
_SESSION_NAME_PREFIX = "mmo-"

TokenSource = Callable[[], str]
"""Mints a fresh web-identity token (called only when the cache has nothing usable)."""


def validate_role_arn(role_arn: str) -> str:
    if not _ROLE_ARN_RE.match(role_arn):
        raise ValueError(
            f"{role_arn!r} is not an IAM role ARN (expected arn:aws:iam::<12-digit account>:role/<name>); "
            f"check the service account's {ROLE_ARN_ANNOTATION} annotation"
        )
    return role_arn


def session_name_for_pod(pod_uid: str) -> str:
    """A RoleSessionName naming the pod, so CloudTrail shows which pod a session belongs to."""
    cleaned = re.sub(r"[^\w+=,.@-]", "-", pod_uid)
    name = (_SESSION_NAME_PREFIX + cleaned)[:64]
    if not _SESSION_NAME_RE.match(name):
        raise ValueError(f"cannot build a RoleSessionName from pod uid {pod_uid!r}")
    return name


@dataclass(frozen=True)
class WebIdentityCredentials:
    """Temporary credentials from AssumeRoleWithWebIdentity (secrets hidden from ``repr``)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    session_token: str = field(repr=False)
    expiration: datetime
    role_arn: str
    assumed_role_arn: str | None = None
    subject: str | None = None

    def expires_within(self, now: datetime, margin: timedelta) -> bool:
        """True if the credentials expire before ``now + margin`` (then get new ones)."""
        return ensure_utc(self.expiration) <= ensure_utc(now) + margin

    def boto3_session(self, region: str) -> boto3.Session:
        """A boto3 Session signing with these credentials (frozen: no refresh)."""
        return boto3.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            region_name=region,
        )

    def metering_client(
        self, region: str, *, endpoint_url: str | None = None, config: Config | None = None
    ) -> MeteringClient:
        """A one-off client; many pods should share a :class:`MeteringClientFactory` instead."""
        return MeteringClient.create(
            region, session=self.boto3_session(region), endpoint_url=endpoint_url, config=config
        )


class WebIdentityExchanger:
    """Calls STS ``AssumeRoleWithWebIdentity`` through an unsigned boto3 ``sts`` client."""

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        config: Config | None = None,
    ) -> None:
        require_region(region, "STS")
        unsigned = Config(signature_version=UNSIGNED)
        self._sts: Any = (session or new_session()).client(
            "sts",
            region_name=region,
            endpoint_url=endpoint_url,
            config=(config or client_config()).merge(unsigned),
        )

    @property
    def endpoint_url(self) -> str:
        return str(self._sts.meta.endpoint_url)

    def assume(
        self,
        role_arn: str,
        token: str,
        *,
        session_name: str,
        duration_seconds: int | None = None,
    ) -> WebIdentityCredentials:
        """Exchange ``token`` for credentials of ``role_arn``; raises :class:`~.errors.MeteringError`."""
        validate_role_arn(role_arn)
        if not _SESSION_NAME_RE.match(session_name):
            raise ValueError(f"RoleSessionName {session_name!r} must be 2-64 characters of [\\w+=,.@-]")
        # A token read from a projected file ends with a newline; it is never part of the JWT.
        token = token.strip()
        if not token:
            raise ValueError("the web-identity token is empty")
        params: dict[str, Any] = {
            "RoleArn": role_arn,
            "RoleSessionName": session_name,
            "WebIdentityToken": token,
        }
        if duration_seconds is not None:
            params["DurationSeconds"] = duration_seconds
        response = call_aws(
            errors.ASSUME_ROLE_WITH_WEB_IDENTITY, self._sts.assume_role_with_web_identity, params
        )
        creds = response["Credentials"]
        return WebIdentityCredentials(
            access_key_id=creds["AccessKeyId"],
            secret_access_key=creds["SecretAccessKey"],
            session_token=creds["SessionToken"],
            expiration=ensure_utc(creds["Expiration"]),
            role_arn=role_arn,
            assumed_role_arn=(response.get("AssumedRoleUser") or {}).get("Arn"),
            subject=response.get("SubjectFromWebIdentityToken"),
        )


class IrsaCredentialCache:
    """Credentials per (role ARN, pod uid), reused until ``margin`` before they expire.

    A pod's registration is retried under throttling; reusing its session saves an STS call and a
    TokenRequest per retry. Entries are per pod because each pod must sign with its own identity.
    Bounded (least recently used entries are dropped first) so a long-running operator does not
    keep every pod it ever saw.

    ``clock`` should be the wall clock (``SystemClock``): credentials expire in real time, also
    when the operator's hour logic follows the emulator's settable clock.
    """

    def __init__(
        self,
        exchanger: WebIdentityExchanger,
        clock: Clock,
        *,
        margin: timedelta = timedelta(minutes=5),
        max_entries: int = 4096,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._exchanger = exchanger
        self._clock = clock
        self._margin = margin
        self._max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], WebIdentityCredentials] = OrderedDict()
        self._lock = threading.Lock()
        self.exchanges = 0

    def get(self, role_arn: str, pod_uid: str, token_source: TokenSource) -> WebIdentityCredentials:
        """Cached credentials for the pod, or a fresh exchange with a token from ``token_source``."""
        key = (role_arn, pod_uid)
        now = self._clock.now()
        with self._lock:
            cached = self._entries.get(key)
            if cached is not None and not cached.expires_within(now, self._margin):
                self._entries.move_to_end(key)
                return cached
        # The exchange runs outside the lock: one slow STS call must not stall other pods.
        fresh = self._exchanger.assume(role_arn, token_source(), session_name=session_name_for_pod(pod_uid))
        with self._lock:
            self.exchanges += 1
            self._entries[key] = fresh
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
        return fresh

    def invalidate(self, role_arn: str, pod_uid: str) -> None:
        """Forget a pod's credentials (pod deleted, or AWS said they expired)."""
        with self._lock:
            self._entries.pop((role_arn, pod_uid), None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def pod_metering_client(
    cache: IrsaCredentialCache,
    factory: MeteringClientFactory,
    role_arn: str,
    pod_uid: str,
    token_source: TokenSource,
) -> MeteringClient:
    """A Metering client signing as the pod: cached IRSA credentials, shared botocore models."""
    return factory.for_credentials(cache.get(role_arn, pod_uid, token_source))
