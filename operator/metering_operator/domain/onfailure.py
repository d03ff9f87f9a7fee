"""``spec.metering.onFailure``: how many hours in a row usage could not be reported, and what follows.

Pure functions of the metering ledger (:mod:`metering_operator.domain.ledger`) and the spec; the
metering side writes their verdict as the ``MeteringHealthy`` condition and the gate reads it back
(:func:`hold_for`), so both judge the same thing.

**An hour that could not be reported** is a closed hour, of the dimensions the spec meters now,
in which no record was accepted (no entry is ``Sent``) and at least one failed:

* ``Rejected`` -- AWS refused it for good (not entitled, unknown dimension, ...);
* ``Expired`` -- every call was refused until the 6-hour window closed (usage carried);
* ``Unconfirmed`` -- the answer never came back within the window;
* ``Pending`` or ``Unknown`` with a recorded error -- still retried, but the last call failed
  (throttling that never ends, egress blocked, ``AccessDenied`` because the role lost
  ``aws-marketplace:MeterUsage``). Counting these at once is what makes the policy act within
  hours rather than after the 6-hour window.

A closed hour whose records were not tried yet (it closed a moment ago) neither counts nor breaks
the run. The run is counted back from the newest closed hour and stops at the first hour with an
accepted record, so **one reported hour resets it** -- also an older hour whose resend finally
went through, since the whole backlog is resent together once AWS answers again. A dry run's
accepted records (``dryRun: true``) count as reported.

An hour in which one dimension was accepted and another refused is not counted: that is a listing
or spec problem of one dimension, shown by ``Metering=False/DimensionRejected`` and ``Ready``, not
a reason to hold the buyer's pods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from metering_operator.domain.conditions import ConditionSpec
from metering_operator.domain.product import (
    ConditionType,
    EntitlementMode,
    FailureAction,
    LedgerEntry,
    LedgerState,
    MeteringStatus,
    OnFailure,
)

HEALTHY = ConditionType.METERING_HEALTHY.value
#: ``MeteringHealthy=False``: ``afterHours`` hours in a row could not be reported.
NOT_REPORTED = "UsageNotReported"
#: ``MeteringHealthy=True`` while some hours failed but fewer than ``afterHours``.
BELOW_THRESHOLD = "FailingBelowThreshold"
REPORTING = "Reporting"

_FINAL_FAILURES = frozenset({LedgerState.REJECTED, LedgerState.EXPIRED, LedgerState.UNCONFIRMED})
_LIVE = frozenset({LedgerState.PENDING, LedgerState.UNKNOWN})


@dataclass(frozen=True)
class FailedHours:
    """The run of closed hours, newest first, that could not be reported."""

    count: int = 0
    #: The oldest hour of the run.
    since: datetime | None = None
    #: The newest hour of the run.
    latest: datetime | None = None
    #: The newest failed record's error, for the condition's message.
    last_error: str | None = None


def _failed(entry: LedgerEntry) -> bool:
    if entry.state in _FINAL_FAILURES:
        return True
    # A live entry counts once a call for it failed; one still in its first call does not.
    return entry.state in _LIVE and entry.attempts > 0 and bool(entry.last_error)


def failed_hours(status: MeteringStatus, dimensions: Sequence[str]) -> FailedHours:
    """How many closed hours in a row (newest first) usage of ``dimensions`` could not be reported."""
    wanted = set(dimensions)
    by_hour: dict[datetime, list[LedgerEntry]] = {}
    for entry in status.ledger:
        if entry.dimension in wanted:
            by_hour.setdefault(entry.hour, []).append(entry)
    count = 0
    since: datetime | None = None
    latest: datetime | None = None
    last_error: str | None = None
    for hour in sorted(by_hour, reverse=True):
        entries = by_hour[hour]
        if any(e.state is LedgerState.SENT for e in entries):
            break  # reported: the run ends here
        failed = [e for e in entries if _failed(e)]
        if not failed:
            continue  # not tried yet: neither counts nor ends the run
        count += 1
        since = hour
        latest = latest or hour
        if last_error is None:
            last_error = next((e.last_error for e in sorted(failed, key=lambda e: e.dimension)), None)
    return FailedHours(count, since, latest, last_error)


def _action_text(action: FailureAction) -> str:
    if action is FailureAction.HOLD_NEW_PODS:
        return "new pods of the product stay behind the scheduling gate until an hour is reported"
    if action is FailureAction.EVICT:
        return (
            "new pods stay behind the scheduling gate and running pods are evicted until an hour is reported"
        )
    return "reported only; pods are not touched"


def health_condition(failed: FailedHours, policy: OnFailure) -> ConditionSpec:
    """The ``MeteringHealthy`` condition for ``failed`` under ``policy``."""
    action = FailureAction(policy.action)
    threshold = f"onFailure {action.value} after {policy.after_hours} hour(s)"
    if failed.count == 0:
        return ConditionSpec(HEALTHY, "True", REPORTING, f"usage is being reported ({threshold})")
    since = failed.since.isoformat() if failed.since else "?"
    detail = f"since the hour starting {since}; last error: {failed.last_error}"
    if failed.count < policy.after_hours:
        return ConditionSpec(
            HEALTHY,
            "True",
            BELOW_THRESHOLD,
            f"{failed.count} hour(s) in a row could not be reported ({detail}); {threshold}",
        )
    return ConditionSpec(
        HEALTHY,
        "False",
        NOT_REPORTED,
        f"{failed.count} hour(s) in a row could not be reported ({detail}); {threshold}: "
        f"{_action_text(action)}",
    )


@dataclass(frozen=True)
class Hold:
    """The gate's input while the product's usage cannot be reported: hold new pods (and evict)."""

    reason: str
    evict: bool = False


def hold_for(
    policy: OnFailure, mode: EntitlementMode, key: str, healthy: Mapping[str, Any] | None
) -> Hold | None:
    """What the gate must do, given the spec's policy and the ``MeteringHealthy`` condition.

    The reason is stable (it names the policy, not the hour count), so a pod already held is not
    written again every hour the outage lasts.
    """
    action = FailureAction(policy.action)
    if action is FailureAction.REPORT or mode is not EntitlementMode.ENFORCE:
        return None
    if healthy is None or healthy.get("status") != "False" or healthy.get("reason") != NOT_REPORTED:
        return None
    reason = (
        f"MeteringFailing: usage of {key} could not be reported for {policy.after_hours} hour(s) or more "
        f"in a row; onFailure {action.value}: held until an hour is reported again"
    )
    return Hold(reason, evict=action is FailureAction.EVICT)
