"""The DryRun MeterUsage check: may the operator report this product's usage at all?

Without it a missing ``aws-marketplace:MeterUsage`` permission shows only after the first hour
closes and its record is refused. So when a product with dimensions starts, and whenever its spec
changes, the operator calls ``MeterUsage`` with ``DryRun=true`` once per dimension, with its own
identity (nothing is billed), and writes the verdict as the ``MeteringPermitted`` condition.

This module is the pure part: when a check is due, and what its answers mean. AWS documents that
a dry run checks the caller's permission; whatever else it answers (a customer not entitled, a
dimension the listing lacks) is shown just the same, with its own reason.

Schedule: a permitted product is checked again every hour, a refused one every 10 minutes (the
seller may have fixed the role meanwhile), and a check that got no usable answer (throttling, an
internal error, a timeout) is retried after 5 s, 10 s, ... up to 5 minutes. A new spec (its
generation), product code or set of dimensions makes a check due at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from metering_operator.domain.conditions import ConditionSpec
from metering_operator.domain.product import ConditionType

PERMITTED = ConditionType.METERING_PERMITTED.value

#: AWS error code -> the condition's reason (anything else refused: ``Refused``).
REASONS = {
    "UnauthorizedException": "AccessDenied",
    "UnauthorizedOperation": "AccessDenied",
    "AccessDenied": "AccessDenied",
    "AccessDeniedException": "AccessDenied",
    "CustomerNotEntitledException": "CustomerNotEntitled",
    "InvalidUsageDimensionException": "InvalidUsageDimension",
    "InvalidProductCodeException": "InvalidProductCode",
    "InvalidEndpointRegionException": "InvalidEndpointRegion",
    "NoCredentials": "NoCredentials",
}


@dataclass(frozen=True)
class CheckPolicy:
    recheck_permitted: timedelta = timedelta(hours=1)
    recheck_refused: timedelta = timedelta(minutes=10)
    initial_backoff: timedelta = timedelta(seconds=5)
    max_backoff: timedelta = timedelta(minutes=5)

    def backoff(self, attempts: int) -> timedelta:
        delay: timedelta = self.initial_backoff * (2 ** min(max(attempts - 1, 0), 20))
        return min(delay, self.max_backoff)


@dataclass(frozen=True)
class DryRunAnswer:
    """One dimension's dry run: ``code`` None means permitted; ``transient``: no usable answer."""

    dimension: str
    code: str | None = None
    message: str = ""
    transient: bool = False


@dataclass(frozen=True)
class PermissionState:
    """What the operator remembers of a product's check (in memory: a restart checks again)."""

    fingerprint: str
    next_at: datetime
    verdict: ConditionSpec | None = None
    #: Checks in a row without a usable answer (the backoff's input).
    attempts: int = 0


def fingerprint(uid: str, generation: int, product_code: str, dimensions: Sequence[str]) -> str:
    """What a check's verdict depends on: a change of any of these makes a new check due."""
    return "\n".join([uid, str(generation), product_code, *sorted(dimensions)])


def due(state: PermissionState | None, current: str, now: datetime) -> bool:
    return state is None or state.fingerprint != current or now >= state.next_at


def verdict(answers: Sequence[DryRunAnswer]) -> ConditionSpec | None:
    """The condition the answers prove, or None when none of them is a usable answer.

    A refusal wins over transient failures of other dimensions: it is an answer.
    """
    refused = [a for a in answers if a.code is not None and not a.transient]
    if refused:
        first = refused[0]
        reason = REASONS.get(first.code or "", "Refused")
        names = ", ".join(a.dimension for a in refused)
        return ConditionSpec(
            PERMITTED,
            "False",
            reason,
            f"DryRun MeterUsage refused for dimension(s) {names}: {first.code}: {first.message}",
        )
    if not answers or any(a.transient for a in answers):
        return None
    names = ", ".join(a.dimension for a in answers)
    return ConditionSpec(
        PERMITTED, "True", "Permitted", f"DryRun MeterUsage permitted for dimension(s) {names}"
    )


def after_check(
    previous: PermissionState | None,
    current: str,
    answers: Sequence[DryRunAnswer],
    now: datetime,
    policy: CheckPolicy,
) -> PermissionState:
    """The state after one check; a check without a usable answer keeps the last verdict."""
    found = verdict(answers)
    if found is None:
        attempts = (previous.attempts if previous is not None and previous.fingerprint == current else 0) + 1
        kept = previous.verdict if previous is not None else None
        transient = next((a for a in answers if a.transient), None)
        if kept is None or previous is None or previous.fingerprint != current:
            detail = f"{transient.code}: {transient.message}" if transient else "no dimensions"
            kept = ConditionSpec(
                PERMITTED, "Unknown", "CheckRetrying", f"DryRun MeterUsage got no usable answer ({detail})"
            )
        return PermissionState(current, now + policy.backoff(attempts), kept, attempts)
    wait = policy.recheck_permitted if found.status == "True" else policy.recheck_refused
    return PermissionState(current, now + wait, found, 0)


def recheck_soon(state: PermissionState | None, now: datetime) -> PermissionState | None:
    """A real MeterUsage was accepted: a refused verdict is checked again at once."""
    if state is None or state.verdict is None or state.verdict.status == "True":
        return state
    return PermissionState(state.fingerprint, min(state.next_at, now), state.verdict, state.attempts)
