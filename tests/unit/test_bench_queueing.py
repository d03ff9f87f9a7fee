"""The rate search's rule for "a steady stream sustains without queueing" (bench/queueing.py)."""

from __future__ import annotations

from bench.queueing import Rule, achieved_rate, highest_sustained, judge

RULE = Rule()


def test_flat_latencies_at_the_offered_rate_are_sustained() -> None:
    verdict = judge(20, 19.8, [0.03, 0.04, 0.035] * 10, RULE)
    assert verdict.sustained
    assert verdict.reasons == ()
    assert verdict.pods == verdict.released == 30


def test_a_backlog_that_grows_through_the_stream_is_queueing() -> None:
    growing = [0.03 + 0.02 * i for i in range(30)]  # each pod waits behind the last
    verdict = judge(20, 20.0, growing, RULE)
    assert not verdict.sustained
    assert any(reason.startswith("last third p99") for reason in verdict.reasons)
    assert verdict.p99_last > 2 * verdict.p99_first


def test_small_jitter_under_the_floor_is_not_counted_as_growth() -> None:
    # 10 ms first, 90 ms last: more than twice, but within 2 x the 50 ms floor.
    verdict = judge(10, 10.0, [0.01] * 10 + [0.02] * 10 + [0.09] * 10, RULE)
    assert verdict.sustained


def test_a_client_that_could_not_offer_the_rate_fails_the_step() -> None:
    verdict = judge(50, 40.0, [0.03] * 30, RULE)
    assert not verdict.sustained
    assert verdict.reasons == ("created 40.0/s < 95% of 50/s",)


def test_a_standing_queue_fails_on_the_median_and_unreleased_pods_fail() -> None:
    assert judge(10, 10.0, [0.8] * 30, RULE).reasons == ("p50 800 ms > 500 ms",)
    lost = judge(10, 10.0, [0.03] * 29 + [None], RULE)
    assert not lost.sustained
    assert "1 pods not released" in lost.reasons


def test_achieved_rate_and_the_highest_sustained_rate() -> None:
    assert achieved_rate([0.0, 0.1, 0.2, 0.3, 0.4]) == 10.0
    assert highest_sustained([(10, True), (15, True), (20, False), (30, True)]) == 15
    assert highest_sustained([(10, False)]) is None
    assert highest_sustained([(10, True), (50, True)]) == 50
