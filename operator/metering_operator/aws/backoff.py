"""Exponential backoff with full jitter, as pure arithmetic.

The operator retries throttled and failed AWS calls itself (botocore's own retries are switched
off, see :mod:`metering_operator.aws.client`), so that every attempt is visible in status, Events
and metrics. "Full jitter" (a uniformly random delay between 0 and the exponential ceiling) spreads
a burst of pods that were throttled together, instead of having them retry in lock-step.

No sleeping and no hidden randomness here: the caller passes the random source and decides how
to wait (kopf's ``delay``, ``asyncio.sleep``, a test's manual clock).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Random = Callable[[], float]
"""Returns a float in [0, 1), like :func:`random.random`."""

# 2**64 times any sane base already exceeds every cap; bounding the exponent avoids
# OverflowError for absurd attempt numbers.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Delays ``uniform(0, min(cap, base * factor**attempt))`` seconds, attempt counted from 0."""

    base: float = 0.5
    cap: float = 60.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        if not self.base > 0:
            raise ValueError(f"backoff base must be positive, got {self.base}")
        if not self.cap >= self.base:
            raise ValueError(f"backoff cap ({self.cap}) must be at least the base ({self.base})")
        if not self.factor >= 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay allowed after failed attempt number ``attempt`` (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")
        exponent = min(attempt, _MAX_EXPONENT)
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, rng: Random = random.random) -> float:
        """A full-jitter delay for ``attempt``: ``rng()`` scaled onto [0, ceiling)."""
        draw = rng()
        if not 0.0 <= draw < 1.0:
            raise ValueError(f"random source must return a float in [0, 1), got {draw}")
        return draw * self.ceiling(attempt)

    def delays(self, rng: Random = random.random) -> Iterator[float]:
        """Endless delays for attempts 0, 1, 2, ... (stop on a deadline or attempt budget)."""
        attempt = 0
        while True:
            yield self.delay(attempt, rng)
            attempt += 1
