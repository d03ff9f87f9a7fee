"""Who is calling: resolve a SigV4-signed request to a caller identity.

Temporary credentials come from the emulator's own STS (stored with the web-identity
session: role, account, service account, pod); long-term keys come from the config's
``staticCredentials``. Credential expiry is judged by the wall clock, because the SDK that
refreshes them runs on real time (see clock.py).
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from typing import Any

from metering_operator.emulator import sigv4
from metering_operator.emulator.config import EmulatorConfig
from metering_operator.emulator.errors import AwsError
from metering_operator.emulator.state import State


@dataclass(frozen=True)
class Caller:
    kind: str  # AssumedRole (web identity) | IAMUser (static keys)
    access_key_id: str
    arn: str
    account: str
    region: str
    info: dict[str, Any] = field(default_factory=dict)
    allowed_actions: tuple[str, ...] = ("aws-marketplace:*",)

    @property
    def pod_uid(self) -> str | None:
        value = self.info.get("podUid")
        return str(value) if value else None

    @property
    def key(self) -> str:
        """What AWS tells callers apart by: the pod for EKS sessions, else the principal."""
        if self.pod_uid:
            return f"pod:{self.pod_uid}"
        if self.kind == "AssumedRole":
            return f"session:{self.info.get('roleArn')}:{self.info.get('subject')}"
        return f"principal:{self.arn}"

    def allowed(self, action: str) -> bool:
        return any(fnmatch.fnmatchcase(action, pattern) for pattern in self.allowed_actions)

    def describe(self) -> dict[str, Any]:
        """CloudTrail-style userIdentity."""
        return {
            "type": self.kind,
            "arn": self.arn,
            "accountId": self.account,
            "accessKeyId": self.access_key_id,
            "callerKey": self.key,
            **{k: v for k, v in self.info.items() if k not in {"arn", "account"}},
        }


def authenticate(
    config: EmulatorConfig,
    state: State,
    incoming: sigv4.IncomingRequest,
    *,
    dialect: str,
    unknown_key_error: AwsError | None = None,
    service: str | None = None,
) -> Caller:
    """Verify the request's SigV4 signature and return the caller, or raise the AWS error.

    ``unknown_key_error`` replaces the usual unknown-key answer (RegisterUsage tells callers
    without an IRSA session that their platform is not supported). ``service``, when given, is
    the SigV4 signing name the credential scope must name (``license-manager``).
    """
    codes = sigv4.CODES[dialect]
    auth = sigv4.parse_authorization(incoming.headers, dialect)
    sigv4.check_freshness(auth, dialect)
    if service is not None and auth.service != service:
        raise AwsError(codes["mismatch"], f"Credential should be scoped to correct service: '{service}'.")
    static = next((c for c in config.static_credentials if c.access_key_id == auth.access_key_id), None)
    if static is not None:
        sigv4.verify(auth, static.secret_access_key, incoming, dialect)
        return Caller(
            kind="IAMUser",
            access_key_id=auth.access_key_id,
            arn=static.arn,
            account=static.account,
            region=auth.region,
            allowed_actions=tuple(static.allowed_actions),
        )
    row = state.credentials(auth.access_key_id)
    if row is None or auth.security_token != row["session_token"]:
        raise unknown_key_error or AwsError(
            codes["unknown_key"], "The security token included in the request is invalid."
        )
    sigv4.verify(auth, row["secret_access_key"], incoming, dialect)
    if row["expiration"] <= time.time():
        raise AwsError(codes["expired"], "The security token included in the request is expired", 403)
    identity: dict[str, Any] = json.loads(row["identity"])
    role = config.role(identity.get("roleArn", ""))
    actions = tuple(role.allowed_actions) if role is not None else ()
    return Caller(
        kind="AssumedRole",
        access_key_id=auth.access_key_id,
        arn=identity["arn"],
        account=identity["account"],
        region=auth.region,
        info=identity,
        allowed_actions=actions,
    )
