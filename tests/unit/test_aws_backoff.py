"""Full-jitter exponential backoff: pure arithmetic with an injected random source."""

from __future__ import annotations

import itertools
import random

import pytest

from metering_operator.aws.backoff import Backoff


def test_ceiling_doubles_then_caps() -> None:
    backoff = Backoff(base=0.5, cap=10.0)
    assert [backoff.ceiling(n) for n in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert Backoff(base=1.0, cap=30.0).ceiling(10_000) == 30.0


def test_delay_is_the_random_draw_scaled_onto_the_ceiling() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    assert backoff.delay(0, lambda: 0.0) == 0.0
    assert backoff.delay(3, lambda: 0.5) == 4.0
    assert backoff.delay(10, lambda: 0.25) == 15.0


def test_full_jitter_spreads_over_the_whole_interval() -> None:
    backoff = Backoff(base=1.0, cap=8.0)
    rng = random.Random(1234)
    draws = [backoff.delay(3, rng.random) for _ in range(2000)]
    assert min(draws) >= 0.0
    assert max(draws) < 8.0
    # Both halves are used: jitter is full, not "equal" (which would never go below 4).
    assert sum(d < 4.0 for d in draws) > 800
    assert sum(d >= 4.0 for d in draws) > 800


def test_delays_iterates_attempts_in_order() -> None:
    backoff = Backoff(base=2.0, cap=100.0)
    assert list(itertools.islice(backoff.delays(lambda: 0.5), 4)) == [1.0, 2.0, 4.0, 8.0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base": 0.0}, "base must be positive"),
        ({"base": 2.0, "cap": 1.0}, "cap"),
        ({"factor": 0.5}, "factor"),
    ],
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="attempt"):
        Backoff().ceiling(-1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        Backoff().delay(0, lambda: 1.0)
