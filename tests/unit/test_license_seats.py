"""License Manager seat decisions: checkout, extend, check in, forget, with a manual clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from metering_operator.domain.clock import ManualClock
from metering_operator.domain.license_seats import (
    CLUSTER_HOLDER,
    EXTEND_WITHIN,
    SeatAction,
    SeatLease,
    SeatStep,
    next_review,
    plan_seats,
)
from metering_operator.domain.product import CheckoutType

T0 = datetime(2031, 7, 9, 10, 0, tzinfo=UTC)
HOUR = timedelta(minutes=60)


def lease(
    holder: str, issued: datetime = T0, *, token: str | None = None, perpetual: bool = False
) -> SeatLease:
    if perpetual:
        return SeatLease(holder, token or f"tok-{holder}", CheckoutType.PERPETUAL, None)
    return SeatLease(holder, token or f"tok-{holder}", CheckoutType.PROVISIONAL, issued + HOUR)


def actions(steps: list[SeatStep]) -> list[tuple[str, str]]:
    return [(str(step.action), step.holder) for step in steps]


def test_new_pods_check_out_and_held_seats_are_left_alone_until_due() -> None:
    clock = ManualClock(T0 + timedelta(minutes=5))
    steps = plan_seats(["a", "b", "c"], [lease("a")], clock.now())
    assert actions(steps) == [("Checkout", "b"), ("Checkout", "c")]


def test_a_lease_is_extended_within_the_margin_and_not_before() -> None:
    clock = ManualClock(T0)
    leases = [lease("a")]
    clock.advance(HOUR - EXTEND_WITHIN - timedelta(seconds=1))
    assert plan_seats(["a"], leases, clock.now()) == []
    clock.advance(timedelta(seconds=1))
    [step] = plan_seats(["a"], leases, clock.now())
    assert (step.action, step.lease) == (SeatAction.EXTEND, leases[0])


def test_scale_down_checks_in_before_anything_is_checked_out() -> None:
    steps = plan_seats(["a", "d"], [lease("a"), lease("b"), lease("c")], T0 + timedelta(minutes=1))
    assert actions(steps) == [("CheckIn", "b"), ("CheckIn", "c"), ("Checkout", "d")]


def test_after_a_crash_lapsed_leases_are_forgotten_and_checked_out_again() -> None:
    """The operator was down for more than the time to live: AWS has returned every seat."""
    clock = ManualClock(T0)
    leases = [lease("a"), lease("gone")]
    clock.advance(HOUR)  # exactly at expiration the seat is AWS's again
    steps = plan_seats(["a"], leases, clock.now())
    assert actions(steps) == [("Forget", "a"), ("Forget", "gone"), ("Checkout", "a")]


def test_two_live_leases_for_one_pod_keep_the_longer_one() -> None:
    older, newer = lease("a", T0, token="old"), lease("a", T0 + timedelta(minutes=10), token="new")
    steps = plan_seats(["a"], [older, newer], T0 + timedelta(minutes=15))
    assert [(step.action, step.lease) for step in steps] == [(SeatAction.CHECK_IN, older)]


def test_perpetual_seats_are_never_extended_nor_checked_in() -> None:
    kept, gone = lease(CLUSTER_HOLDER, perpetual=True), lease("pod", perpetual=True)
    steps = plan_seats([CLUSTER_HOLDER], [kept, gone], T0 + timedelta(days=400))
    assert [(step.action, step.lease) for step in steps] == [(SeatAction.FORGET, gone)]
    assert next_review([kept], T0) is None


def test_next_review_is_when_the_first_extension_falls_due() -> None:
    leases = [lease("a", T0), lease("b", T0 + timedelta(minutes=30)), lease("c", perpetual=True)]
    assert next_review(leases, T0) == T0 + HOUR - EXTEND_WITHIN
    late = T0 + timedelta(minutes=50)
    assert next_review(leases, late) == late  # overdue: now


holders = st.sampled_from(["a", "b", "c", "d", CLUSTER_HOLDER])
leases_strategy = st.lists(
    st.builds(
        lambda holder, minutes, perpetual, n: lease(
            holder, T0 + timedelta(minutes=minutes), token=f"t{n}", perpetual=perpetual
        ),
        holders,
        st.integers(min_value=-120, max_value=60),
        st.booleans(),
        st.integers(min_value=0, max_value=10**6),
    ),
    max_size=8,
)


@given(needed=st.sets(holders), leases=leases_strategy)
def test_after_the_plan_every_needed_holder_has_exactly_one_seat_and_no_one_else_does(
    needed: set[str], leases: list[SeatLease]
) -> None:
    now = T0 + timedelta(minutes=30)
    steps = plan_seats(needed, leases, now)
    dropped = {id(step.lease) for step in steps if step.action in (SeatAction.CHECK_IN, SeatAction.FORGET)}
    remaining = [x for x in leases if id(x) not in dropped]
    holding = [x.holder for x in remaining] + [s.holder for s in steps if s.action is SeatAction.CHECKOUT]
    assert sorted(holding) == sorted(needed)
    assert all(not x.lapsed(now) for x in remaining)
    # Returning seats always comes before asking for new ones.
    order = [step.action for step in steps]
    if SeatAction.CHECKOUT in order and SeatAction.CHECK_IN in order:
        assert max(i for i, a in enumerate(order) if a is SeatAction.CHECK_IN) < order.index(
            SeatAction.CHECKOUT
        )
    assert not any(
        step.action is SeatAction.CHECK_IN and step.lease and step.lease.expiration is None for step in steps
    )


# --- NoEntitlementsAllowed: exhausted or not entitled --------------------------------------------------

from metering_operator.domain.license_seats import (  # noqa: E402
    NeededEntitlement,
    OfferedEntitlement,
    OfferedLicense,
    client_token,
    judge_refusal,
)

ARN = "arn:aws:license-manager::111122223333:license:l-abc"
SEAT = NeededEntitlement("seats", "Count", 1)


def offered(*entitlements: OfferedEntitlement, status: str = "AVAILABLE", **kw: datetime) -> OfferedLicense:
    return OfferedLicense(ARN, status, tuple(entitlements), **kw)


def test_a_license_with_the_seats_means_none_is_free_now() -> None:
    refusal = judge_refusal([offered(OfferedEntitlement("seats", "Count", 3))], [SEAT], T0)
    assert refusal.exhausted
    assert refusal.reason.startswith("SeatsExhausted:")


def test_no_license_another_unit_too_few_in_all_or_expired_is_final() -> None:
    cases = [
        ([], "received no license"),
        ([offered(OfferedEntitlement("cores", "Count", 3))], "no entitlement seats"),
        ([offered(OfferedEntitlement("seats", "Gigabytes", 3))], "in Gigabytes, not Count"),
        ([offered(OfferedEntitlement("seats", "Count", 1))], "has 1 Count in all, 2 are asked"),
        ([offered(OfferedEntitlement("seats", "Count", 3), status="EXPIRED")], "is EXPIRED"),
        ([offered(OfferedEntitlement("seats", "Count", 3), end=T0)], "ended at"),
        ([offered(OfferedEntitlement("seats", "Count", 3), begin=T0 + HOUR)], "not valid before"),
    ]
    for licenses, why in cases:
        need = NeededEntitlement("seats", "Count", 2)
        refusal = judge_refusal(licenses, [need], T0)
        assert not refusal.exhausted, licenses
        assert refusal.reason.startswith("NoEntitlementsAllowed:")
        assert why in refusal.reason, refusal.reason


def test_one_usable_license_among_several_is_enough_to_wait() -> None:
    licenses = [
        offered(OfferedEntitlement("seats", "Count", 3), status="EXPIRED"),
        offered(OfferedEntitlement("seats", "Count", None), OfferedEntitlement("premium", "None")),
    ]
    wanted = [SEAT, NeededEntitlement("premium", "None", 1)]
    assert judge_refusal(licenses, wanted, T0).exhausted


def test_client_tokens_are_stable_per_holder_and_checkout_number() -> None:
    assert client_token("uid-1", 1) == client_token("uid-1", 1)
    assert len({client_token("uid-1", 1), client_token("uid-1", 2), client_token("uid-2", 1)}) == 3
