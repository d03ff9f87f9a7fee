"""The send protocol: one MeterUsage call, its typed outcome, and the ledger transition for it.

The caller has already written the claim (the entry is Unknown, ``attempts`` + 1) before
:func:`call`; :func:`transition` then turns the outcome into the pure ledger transition that
records it. What an AWS error means is decided in one place, :mod:`metering_operator.aws.errors`
(:func:`~metering_operator.aws.errors.meter_usage_disposition`); this module only maps it:

============== ============================================ ==================================
outcome         meaning                                      ledger
============== ============================================ ==================================
Accepted        AWS answered with a record id (or dry run)   Sent
Refused RETRY   answered with a retryable error              Pending (or Unknown), backoff
Refused FINAL   answered; resending can never succeed        Rejected
Refused WINDOW  TimestampOutOfBounds                         retried, or settled if too late
NoAnswer        no answer: AWS may have recorded it          Unknown, resent identically
============== ============================================ ==================================
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from metering_operator.aws.client import MeteringClient
from metering_operator.aws.errors import MeteringError, MeterUsageDisposition, meter_usage_disposition

__all__ = ["Accepted", "MeterUsageDisposition", "NoAnswer", "Outcome", "Refused", "call", "transition"]
from metering_operator.aws.models import MeterUsageRequest
from metering_operator.domain import ledger
from metering_operator.domain.ledger import DimensionRule, LedgerEntry, MeteringStatus, Policy

log = logging.getLogger(__name__)

Transition = Callable[[MeteringStatus, datetime], MeteringStatus]


@dataclass(frozen=True)
class Accepted:
    record_id: str | None
    dry_run: bool


@dataclass(frozen=True)
class Refused:
    error: str
    disposition: MeterUsageDisposition


@dataclass(frozen=True)
class NoAnswer:
    error: str


Outcome = Accepted | Refused | NoAnswer


def call(aws: MeteringClient, request: MeterUsageRequest) -> Outcome:
    """Make the call; every way it can end is one of the three outcomes."""
    try:
        result = aws.meter_usage(request)
    except MeteringError as exc:
        disposition = meter_usage_disposition(exc)
        error = f"{exc.code}: {exc.message}"
        if disposition is MeterUsageDisposition.NO_ANSWER:
            return NoAnswer(error)
        return Refused(error, disposition)
    except Exception as exc:  # not an AWS answer (a bug, a dead transport): assume the worst
        log.exception("MeterUsage for %s at %s failed", request.usage_dimension, request.timestamp)
        return NoAnswer(f"{type(exc).__name__}: {exc}")
    return Accepted(result.metering_record_id, result.dry_run)


def transition(
    outcome: Outcome, entry: LedgerEntry, policy: Policy, rules: Sequence[DimensionRule]
) -> Transition:
    """The pure ledger transition that records ``outcome`` for ``entry``."""
    match outcome:
        case Accepted(record_id=record_id, dry_run=dry_run):
            return lambda s, now: ledger.mark_sent(s, entry, record_id, now, dry_run)
        case NoAnswer(error=error):
            return lambda s, now: ledger.mark_no_answer(s, entry, error, now, policy, rules)
        case Refused(error=error, disposition=MeterUsageDisposition.FINAL):
            return lambda s, now: ledger.mark_rejected(s, entry, error)
        case Refused(error=error, disposition=MeterUsageDisposition.OUT_OF_WINDOW):
            return lambda s, now: ledger.mark_out_of_window(s, entry, error, now, policy, rules)
        case Refused(error=error):
            return lambda s, now: ledger.mark_transient(s, entry, error, now, policy, rules)
    raise AssertionError(f"unhandled outcome {outcome!r}")  # pragma: no cover
