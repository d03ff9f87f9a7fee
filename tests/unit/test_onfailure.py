"""spec.metering.onFailure and the DryRun permission check: the pure rules, with an injected clock.

``failed_hours`` reads the ledger alone; ``health_condition`` and ``hold_for`` turn it into the
MeteringHealthy condition and the gate's input; ``domain.permission`` schedules the DryRun check
and reads its answers. Nothing here sleeps: times are passed in.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from pydantic import ValidationError

from metering_operator.domain import onfailure, permission
from metering_operator.domain.product import (
    EntitlementMode,
    FailureAction,
    LedgerEntry,
    LedgerState,
    MeteredProduct,
    MeteredProductSpec,
    MeteringStatus,
    OnFailure,
)
from metering_operator.metering.plan import ProductPlan
from metering_operator.metering.status import metering_status

H0 = datetime(2031, 3, 4, 10, tzinfo=UTC)
HOUR = timedelta(hours=1)
DIMS = ["replicas", "vcpu"]


def entry(
    hour: int, dimension: str, state: LedgerState, *, attempts: int = 1, error: str | None = None
) -> LedgerEntry:
    return LedgerEntry(
        hour=H0 + hour * HOUR,
        dimension=dimension,
        quantity=Decimal(2),
        state=state,
        attempts=attempts,
        answered=attempts if state is LedgerState.PENDING else 0,
        last_error=error,
        metering_record_id="rec" if state is LedgerState.SENT else None,
    )


def ledger(*entries: LedgerEntry) -> MeteringStatus:
    return MeteringStatus(ledger=list(entries))


DENIED = "UnauthorizedException: not authorized to perform aws-marketplace:MeterUsage"


def both(hour: int, state: LedgerState, **kw: object) -> list[LedgerEntry]:
    return [entry(hour, d, state, **kw) for d in DIMS]  # type: ignore[arg-type]


# --- failed hours ----------------------------------------------------------------------------------


def test_an_empty_or_reported_ledger_has_no_failed_hours() -> None:
    assert onfailure.failed_hours(ledger(), DIMS).count == 0
    assert onfailure.failed_hours(ledger(*both(0, LedgerState.SENT)), DIMS).count == 0


def test_failing_hours_count_newest_first_until_a_reported_hour() -> None:
    status = ledger(
        *both(0, LedgerState.SENT),
        *both(1, LedgerState.EXPIRED, error="InternalServiceErrorException: x"),
        *both(2, LedgerState.UNCONFIRMED, error="no answer"),
        *both(3, LedgerState.PENDING, error=DENIED),
        *both(4, LedgerState.UNKNOWN, attempts=2, error="no answer: ReadTimeoutError"),
    )
    failed = onfailure.failed_hours(status, DIMS)
    assert (failed.count, failed.since, failed.latest) == (4, H0 + HOUR, H0 + 4 * HOUR)
    assert failed.last_error == "no answer: ReadTimeoutError"


def test_one_reported_hour_resets_the_count() -> None:
    status = ledger(*both(0, LedgerState.PENDING, error=DENIED), *both(1, LedgerState.SENT))
    assert onfailure.failed_hours(status, DIMS).count == 0


def test_an_hour_not_tried_yet_neither_counts_nor_breaks_the_run() -> None:
    status = ledger(
        *both(0, LedgerState.PENDING, error=DENIED),
        *both(1, LedgerState.PENDING, error=DENIED),
        *both(2, LedgerState.PENDING, attempts=0),  # just closed
        *[entry(3, d, LedgerState.UNKNOWN, attempts=1) for d in DIMS],  # first call in flight
    )
    assert onfailure.failed_hours(status, DIMS).count == 2


def test_one_dimension_accepted_means_the_hour_was_reported() -> None:
    """A dimension the listing refuses is a DimensionRejected problem, not a reason to hold pods."""
    status = ledger(
        entry(0, "replicas", LedgerState.SENT),
        entry(0, "vcpu", LedgerState.REJECTED, error="InvalidUsageDimensionException: no"),
    )
    assert onfailure.failed_hours(status, DIMS).count == 0


def test_every_dimension_refused_for_good_counts() -> None:
    status = ledger(*both(0, LedgerState.REJECTED, error="CustomerNotEntitledException: no"))
    assert onfailure.failed_hours(status, DIMS).count == 1


def test_dimensions_no_longer_in_the_spec_are_not_judged() -> None:
    status = ledger(entry(0, "old", LedgerState.REJECTED, error="x"), *both(1, LedgerState.SENT))
    assert onfailure.failed_hours(status, DIMS).count == 0
    assert onfailure.failed_hours(ledger(entry(0, "old", LedgerState.REJECTED, error="x")), DIMS).count == 0


def test_dry_run_records_count_as_reported() -> None:
    sent = [
        e.model_copy(update={"metering_record_id": None, "last_error": "dry run"})
        for e in both(1, LedgerState.SENT)
    ]
    status = ledger(*both(0, LedgerState.PENDING, error=DENIED), *sent)
    assert onfailure.failed_hours(status, DIMS).count == 0


# --- the condition and the hold ----------------------------------------------------------------------


def test_the_condition_turns_false_exactly_at_after_hours() -> None:
    policy = OnFailure(action=FailureAction.HOLD_NEW_PODS, after_hours=2)
    ok = onfailure.health_condition(onfailure.FailedHours(), policy)
    assert (ok.type, ok.status, ok.reason) == ("MeteringHealthy", "True", "Reporting")
    one = onfailure.health_condition(onfailure.FailedHours(1, H0, H0, DENIED), policy)
    assert (one.status, one.reason) == ("True", "FailingBelowThreshold")
    two = onfailure.health_condition(onfailure.FailedHours(2, H0, H0 + HOUR, DENIED), policy)
    assert (two.status, two.reason) == ("False", "UsageNotReported")
    assert "HoldNewPods" in two.message
    assert DENIED in two.message
    assert "scheduling gate" in two.message


def healthy(status: str, reason: str) -> dict[str, str]:
    return {"type": "MeteringHealthy", "status": status, "reason": reason}


@pytest.mark.parametrize(
    ("action", "mode", "condition", "expected"),
    [
        (FailureAction.HOLD_NEW_PODS, EntitlementMode.ENFORCE, healthy("False", "UsageNotReported"), False),
        (FailureAction.EVICT, EntitlementMode.ENFORCE, healthy("False", "UsageNotReported"), True),
        (FailureAction.REPORT, EntitlementMode.ENFORCE, healthy("False", "UsageNotReported"), None),
        (FailureAction.HOLD_NEW_PODS, EntitlementMode.AUDIT, healthy("False", "UsageNotReported"), None),
        (
            FailureAction.HOLD_NEW_PODS,
            EntitlementMode.ENFORCE,
            healthy("True", "FailingBelowThreshold"),
            None,
        ),
        (FailureAction.HOLD_NEW_PODS, EntitlementMode.ENFORCE, None, None),
    ],
)
def test_hold_for(
    action: FailureAction, mode: EntitlementMode, condition: dict[str, str] | None, expected: bool | None
) -> None:
    hold = onfailure.hold_for(OnFailure(action=action, after_hours=3), mode, "shop/paid", condition)
    if expected is None:
        assert hold is None
    else:
        assert hold is not None
        assert hold.evict is expected
        assert "shop/paid" in hold.reason
        assert action.value in hold.reason


def test_the_hold_reason_does_not_change_with_the_hour_count() -> None:
    """A held pod is written once per hold, not every hour the outage lasts."""
    policy = OnFailure(action=FailureAction.HOLD_NEW_PODS, after_hours=1)
    cond = healthy("False", "UsageNotReported")
    assert onfailure.hold_for(
        policy, EntitlementMode.ENFORCE, "a/b", {**cond, "message": "1"}
    ) == onfailure.hold_for(policy, EntitlementMode.ENFORCE, "a/b", {**cond, "message": "5"})


# --- the spec ---------------------------------------------------------------------------------------


def spec(on_failure: dict[str, object], mode: str = "Enforce") -> MeteredProductSpec:
    return MeteredProductSpec.model_validate(
        {
            "productCode": "prod1",
            "publicKeyVersion": 1,
            "publicKey": {"pem": "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----"},
            "selector": {},
            "entitlement": {"mode": mode},
            "metering": {"dimensions": [{"name": "d", "source": "Replicas"}], "onFailure": on_failure},
        }
    )


def test_on_failure_defaults_and_bounds() -> None:
    default = spec({}).metering.on_failure
    assert (default.action, default.after_hours) == (FailureAction.REPORT, 3)
    assert spec({"action": "Evict", "afterHours": 24}).metering.on_failure.after_hours == 24
    for bad in (0, 25, "3"):
        with pytest.raises(ValidationError):
            spec({"afterHours": bad})
    with pytest.raises(ValidationError, match=r"need entitlement\.mode Enforce"):
        spec({"action": "HoldNewPods"}, mode="Audit")
    assert spec({"action": "Report"}, mode="Audit").metering.on_failure.action is FailureAction.REPORT


# --- the DryRun permission check ---------------------------------------------------------------------

POLICY = permission.CheckPolicy()
FP = permission.fingerprint("uid", 1, "prod1", ["a", "b"])


def test_a_first_check_is_due_at_once_and_a_spec_change_makes_one_due_again() -> None:
    assert permission.due(None, FP, H0)
    state = permission.after_check(
        None, FP, [permission.DryRunAnswer("a"), permission.DryRunAnswer("b")], H0, POLICY
    )
    assert state.verdict is not None
    assert (state.verdict.status, state.verdict.reason) == ("True", "Permitted")
    assert not permission.due(state, FP, H0 + timedelta(minutes=59))
    assert permission.due(state, FP, H0 + HOUR)
    assert permission.due(state, permission.fingerprint("uid", 2, "prod1", ["a", "b"]), H0)
    assert permission.due(state, permission.fingerprint("uid", 1, "prod1", ["a", "c"]), H0)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("UnauthorizedException", "AccessDenied"),
        ("AccessDeniedException", "AccessDenied"),
        ("CustomerNotEntitledException", "CustomerNotEntitled"),
        ("InvalidUsageDimensionException", "InvalidUsageDimension"),
        ("SomethingNew", "Refused"),
    ],
)
def test_a_refusal_is_a_false_verdict_with_a_specific_reason_rechecked_in_ten_minutes(
    code: str, reason: str
) -> None:
    answers = [permission.DryRunAnswer("a"), permission.DryRunAnswer("b", code, "no")]
    state = permission.after_check(None, FP, answers, H0, POLICY)
    assert state.verdict is not None
    assert (state.verdict.status, state.verdict.reason) == ("False", reason)
    assert "b" in state.verdict.message
    assert code in state.verdict.message
    assert state.next_at == H0 + timedelta(minutes=10)


def test_no_usable_answer_retries_on_a_backoff_and_keeps_the_last_verdict() -> None:
    throttled = [permission.DryRunAnswer("a", "ThrottlingException", "slow", transient=True)]
    first = permission.after_check(None, FP, throttled, H0, POLICY)
    assert first.verdict is not None
    assert (first.verdict.status, first.verdict.reason) == (
        "Unknown",
        "CheckRetrying",
    )
    assert first.next_at == H0 + timedelta(seconds=5)
    second = permission.after_check(first, FP, throttled, first.next_at, POLICY)
    assert second.next_at == first.next_at + timedelta(seconds=10)
    permitted = permission.after_check(second, FP, [permission.DryRunAnswer("a")], H0 + HOUR, POLICY)
    later = permission.after_check(permitted, FP, throttled, H0 + 2 * HOUR, POLICY)
    assert later.verdict == permitted.verdict  # a throttled re-check does not undo what was proven
    capped = later
    for _ in range(12):
        capped = permission.after_check(capped, FP, throttled, H0, POLICY)
    assert capped.next_at == H0 + timedelta(minutes=5)


def test_a_refusal_wins_over_a_transient_failure_of_another_dimension() -> None:
    answers = [
        permission.DryRunAnswer("a", "ThrottlingException", "slow", transient=True),
        permission.DryRunAnswer("b", "UnauthorizedException", "no"),
    ]
    verdict = permission.verdict(answers)
    assert verdict is not None
    assert verdict.reason == "AccessDenied"


def test_an_accepted_record_makes_a_refused_verdict_due_again() -> None:
    refused = permission.after_check(
        None, FP, [permission.DryRunAnswer("a", "UnauthorizedException", "no")], H0, POLICY
    )
    soon = permission.recheck_soon(refused, H0 + timedelta(minutes=1))
    assert soon is not None
    assert permission.due(soon, FP, H0 + timedelta(minutes=1))
    permitted = permission.after_check(None, FP, [permission.DryRunAnswer("a")], H0, POLICY)
    assert permission.recheck_soon(permitted, H0) == permitted


# --- the status the metering side writes ------------------------------------------------------------


def test_every_metering_status_write_carries_metering_healthy() -> None:
    """metering_status (used by every ledger write) sets MeteringHealthy next to Metering."""
    obj = {
        "metadata": {"name": "db", "namespace": "shop", "uid": "u", "generation": 2},
        "spec": spec({"action": "HoldNewPods", "afterHours": 1}).to_kube(),
        "status": {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Configured",
                    "lastTransitionTime": "2031-03-04T09:00:00Z",
                }
            ]
        },
    }
    plan = ProductPlan.of(MeteredProduct.from_kube(obj))
    failing = ledger(entry(0, "d", LedgerState.PENDING, error=DENIED))
    status = metering_status(obj, plan, failing, H0 + HOUR)
    by_type = {c["type"]: c for c in status["conditions"]}
    assert set(by_type) == {"Ready", "Metering", "MeteringHealthy"}
    assert (by_type["MeteringHealthy"]["status"], by_type["MeteringHealthy"]["reason"]) == (
        "False",
        "UsageNotReported",
    )
    assert by_type["MeteringHealthy"]["observedGeneration"] == 2
    reported = metering_status(obj, plan, ledger(entry(0, "d", LedgerState.SENT)), H0 + HOUR)
    assert {c["type"]: c["status"] for c in reported["conditions"]}["MeteringHealthy"] == "True"
