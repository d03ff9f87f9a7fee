"""Scope ``Cluster``: one RegisterUsage as the operator itself, kept in status and renewed.

The product's pods are released on this one registration's result (nonce = the kube-system
namespace uid). The registration is recorded in ``status.registration`` -- state, nonce, the
signature and when -- so a restarted operator reuses a verified grant or a denial instead of
asking AWS again. These functions run in the gate's worker threads (:func:`register`) or are
pure (:func:`restore`, :func:`to_status`); the product controller owns the state machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metering_operator.aws import errors as aws_errors
from metering_operator.domain import entitlement as ent
from metering_operator.domain.clock import Clock
from metering_operator.domain.conditions import format_time, parse_time
from metering_operator.domain.product import EntitlementState
from metering_operator.domain.signature import SignatureError, VerifiedSignature
from metering_operator.gate.runtime import GateRuntime, ProductInfo

log = logging.getLogger(__name__)

#: The operator's own registration is renewed this often.
RENEW_SECONDS = 3600.0


@dataclass
class ClusterRegistration:
    """The product's cluster-scope registration and when to try (or renew) it next."""

    state: EntitlementState
    nonce: str
    signature: VerifiedSignature | None = None
    token: str = ""
    registered_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    renew_at: float = 0.0  # time.monotonic()

    def due(self) -> bool:
        """Whether to call RegisterUsage now: a denial is final; a grant is renewed, and a failed
        attempt retried, at ``renew_at`` (the backoff :func:`register` chose)."""
        return self.state is not EntitlementState.DENIED and self.renew_at <= time.monotonic()

    @property
    def settled(self) -> bool:
        """Granted or Denied: pods can be released or refused on it."""
        return self.state in (EntitlementState.GRANTED, EntitlementState.DENIED)


def restore(registration: Mapping[str, Any], info: ProductInfo, clock: Clock) -> ClusterRegistration | None:
    """A registration from ``status.registration`` worth reusing (verified grant, or a denial)."""
    token = registration.get("signature")
    nonce = registration.get("nonce")
    state = registration.get("state")
    attempts = int(registration.get("attempts") or 0)
    if state == EntitlementState.DENIED.value:
        return ClusterRegistration(
            EntitlementState.DENIED, nonce or "", last_error=registration.get("lastError"), attempts=attempts
        )
    if state != EntitlementState.GRANTED.value or not token or not nonce or info.public_key is None:
        return None
    try:
        verified = info.product_key().verify(token, nonce)
    except SignatureError:
        return None
    registered_at = parse_time(registration.get("registeredAt"))
    age = (clock.now() - registered_at).total_seconds() if registered_at else RENEW_SECONDS
    return ClusterRegistration(
        EntitlementState.GRANTED,
        nonce,
        verified,
        token,
        registered_at,
        attempts=attempts,
        renew_at=time.monotonic() + max(0.0, RENEW_SECONDS - age),
    )


def register(rt: GateRuntime, info: ProductInfo, previous: ClusterRegistration | None) -> ClusterRegistration:
    """One RegisterUsage as the operator (blocking: a worker thread). Never raises."""
    attempts = (previous.attempts if previous else 0) + 1
    nonce = ""
    try:
        nonce = rt.kube_system_uid()
        verified = rt.registrar.register_cluster(info.product_key(), nonce)
        return ClusterRegistration(
            EntitlementState.GRANTED,
            nonce,
            verified,
            verified.token,
            rt.clock.now(),
            attempts,
            None,
            time.monotonic() + RENEW_SECONDS,
        )
    except aws_errors.MeteringError as exc:
        reason = f"{exc.code}: {exc.message}"
        if exc.operation == aws_errors.REGISTER_USAGE and exc.denied:
            # Recorded in status with its nonce: a restarted operator must not ask again.
            return ClusterRegistration(EntitlementState.DENIED, nonce, attempts=attempts, last_error=reason)
        # A failed renewal keeps a grant that is still valid; a first attempt waits and retries.
        keep = previous if previous and previous.state is EntitlementState.GRANTED else None
        result = keep or ClusterRegistration(
            EntitlementState.PENDING if exc.retryable else EntitlementState.ERROR,
            "",
            attempts=attempts,
        )
        result.renew_at = time.monotonic() + ent.backoff_delay(min(attempts, 8), base=1.0, cap=60.0)
        result.last_error = reason
        return result
    except Exception as exc:
        log.exception("cluster registration for %s failed", info.key)
        return ClusterRegistration(
            EntitlementState.ERROR,
            "",
            attempts=attempts,
            last_error=str(exc),
            renew_at=time.monotonic() + 30.0,
        )


def to_status(cluster: ClusterRegistration | None) -> dict[str, Any] | None:
    """``status.registration`` for ``cluster`` (None: the product has no cluster registration)."""
    if cluster is None:
        return None
    status: dict[str, Any] = {"state": cluster.state.value, "attempts": cluster.attempts}
    if cluster.nonce:
        status["nonce"] = cluster.nonce
    if cluster.token:
        status["signature"] = cluster.token
    if cluster.registered_at is not None:
        status["registeredAt"] = format_time(cluster.registered_at)
    if cluster.last_error:
        status["lastError"] = cluster.last_error[:1024]
    return status
