"""Scope ``Cluster``: one RegisterUsage as the operator itself, kept in status and renewed.

The product's pods are released on this one registration's result (nonce = the kube-system
namespace uid). The registration is recorded in ``status.registration`` (the pydantic
:class:`~metering_operator.domain.product.Registration`, the same model that generates the CRD),
so a restarted operator can reuse a grant instead of asking AWS again -- but only what it can
prove (:func:`restore`): a status is writable by more than the operator, so

* the signature must verify for the product *and* for nonce = the kube-system uid read from the
  API server now (never the ``nonce`` the status itself claims);
* its age comes from the signed ``iat`` claim, never from the unsigned ``registeredAt``; a
  signature without ``iat``, from the future, or older than :data:`RENEW_SECONDS` is not reused;
* the next renewal is ``iat + RENEW_SECONDS``: bounded, whatever the status says;
* a ``Denied`` record is kept only with the kube-system uid as its nonce (a denial only ever
  holds pods back);
* anything else is registered again.

:func:`register` runs in a worker thread (one AWS call, no retry loop: the state machine
schedules retries with the gate's one backoff).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from metering_operator.aws import errors as aws_errors
from metering_operator.domain.product import EntitlementState, Registration
from metering_operator.domain.signature import ProductKey, SignatureError, VerifiedSignature

log = logging.getLogger(__name__)

#: The operator's own registration is renewed this often (and a stored one older than this is
#: not reused after a restart).
RENEW_SECONDS = 3600.0
#: How far a signature's ``iat`` may lie in the future (clock skew between AWS and the cluster).
MAX_CLOCK_SKEW_SECONDS = 300.0


@dataclass(frozen=True)
class ClusterRegistration:
    """The product's cluster-scope registration: the status record, and what only memory holds."""

    record: Registration
    #: When to call RegisterUsage again (renewal of a grant); None: never (a denial is final).
    renew_at: datetime | None = None
    #: The verification of ``record.signature`` (Granted only).
    verified: VerifiedSignature | None = None

    @property
    def state(self) -> EntitlementState:
        return self.record.state

    @property
    def token(self) -> str:
        return self.record.signature or ""

    @property
    def reason(self) -> str:
        return self.record.last_error or ""

    @property
    def settled(self) -> bool:
        """Granted or Denied: pods can be released or refused on it."""
        return self.state in (EntitlementState.GRANTED, EntitlementState.DENIED)

    def due(self, now: datetime) -> bool:
        """Whether to call RegisterUsage now: a denial is final; a grant is renewed at ``renew_at``."""
        return self.renew_at is not None and self.renew_at <= now

    def to_status(self) -> dict[str, Any]:
        return self.record.to_kube()


def restore(
    stored: Mapping[str, Any] | None, key: ProductKey, kube_system_uid: str, now: datetime
) -> ClusterRegistration | None:
    """A registration from ``status.registration`` worth reusing, or None (register again)."""
    if not stored:
        return None
    try:
        record = Registration.model_validate(dict(stored))
    except ValidationError:
        return None
    if record.nonce != kube_system_uid:
        return None  # another cluster's, or another pod's, registration: not ours
    if record.state is EntitlementState.DENIED:
        return ClusterRegistration(record, renew_at=None)
    if record.state is not EntitlementState.GRANTED or not record.signature:
        return None
    try:
        verified = key.verify(record.signature, kube_system_uid)
    except SignatureError:
        return None
    issued = verified.issued_at
    if issued is None:
        return None
    age = (now - issued).total_seconds()
    if age < -MAX_CLOCK_SKEW_SECONDS or age >= RENEW_SECONDS:
        return None
    # registeredAt is rewritten from the signed iat: the unsigned value is never carried on.
    record = record.model_copy(update={"registered_at": issued, "last_error": None})
    return ClusterRegistration(record, issued + timedelta(seconds=RENEW_SECONDS), verified)


def granted(verified: VerifiedSignature, nonce: str, attempts: int, now: datetime) -> ClusterRegistration:
    """A fresh grant, renewed RENEW_SECONDS after its signed ``iat`` (or now, without one)."""
    issued = verified.issued_at or now
    record = Registration(
        state=EntitlementState.GRANTED,
        nonce=nonce,
        signature=verified.token,
        registered_at=issued,
        attempts=attempts,
    )
    renew = min(issued, now) + timedelta(seconds=RENEW_SECONDS)
    return ClusterRegistration(record, renew, verified)


def denied(nonce: str, reason: str, attempts: int) -> ClusterRegistration:
    record = Registration(
        state=EntitlementState.DENIED, nonce=nonce or None, attempts=attempts, last_error=reason[:1024]
    )
    return ClusterRegistration(record, None)


def failed(
    previous: ClusterRegistration | None, reason: str, transient: bool, attempts: int
) -> ClusterRegistration:
    """A failed attempt: a still-valid grant is kept (its renewal retried), else Pending/Error.

    ``renew_at`` is left for the state machine to set from the gate's backoff."""
    if previous is not None and previous.state is EntitlementState.GRANTED:
        return replace(
            previous,
            record=previous.record.model_copy(update={"last_error": reason[:1024], "attempts": attempts}),
        )
    state = EntitlementState.PENDING if transient else EntitlementState.ERROR
    return ClusterRegistration(
        Registration(state=state, attempts=attempts, last_error=reason[:1024]), renew_at=None
    )


def classify(exc: aws_errors.MeteringError) -> tuple[bool, bool]:
    """(denied, transient) for a RegisterUsage failure, by :mod:`metering_operator.aws.errors`."""
    denied_ = exc.operation == aws_errors.REGISTER_USAGE and exc.denied
    return denied_, (not denied_ and exc.retryable)
