"""When does a steady stream of gated pods queue? The rule the rate search applies, kept pure.

A stream "sustains without queueing" when the operator's releases keep pace with the creations.
If they do not, a backlog builds from the first pod on and every later pod waits behind it: the
latency of the stream's last third grows well past its first third's, however short the stream.
The rule, for one stream of pods created at ``target`` pods/s (latencies in creation order):

1. the client offered the load: the achieved creation rate is at least ``min_achieved`` (95 %) of
   the target -- creates go through the operator's admission webhook, so a create path that cannot
   keep up is the operator not keeping pace too;
2. no growth: the p99 gate latency of the last third of the pods is at most ``growth`` (2x) the p99
   of the first third, the first third's counted as at least ``floor_s`` (50 ms: a wait of about
   one pod's own service time is noise on a shared machine, not a queue);
3. no standing queue: the p50 of all pods is at most ``max_p50_s`` (500 ms);
4. every pod was released.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (as bench_entitlement.pct); NaN for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass(frozen=True)
class Rule:
    min_achieved: float = 0.95
    growth: float = 2.0
    floor_s: float = 0.05
    max_p50_s: float = 0.5

    def describe(self) -> str:
        return (
            f"achieved creation rate >= {self.min_achieved:.0%} of the target; p99 of the last third of the "
            f"pods (creation order) <= {self.growth:g} x max(p99 of the first third, "
            f"{self.floor_s * 1000:.0f} ms); p50 of all pods <= {self.max_p50_s * 1000:.0f} ms; "
            "every pod released"
        )


@dataclass(frozen=True)
class Verdict:
    target: float
    achieved: float
    pods: int
    released: int
    p50: float
    p99: float
    p99_first: float
    p99_last: float
    sustained: bool
    reasons: tuple[str, ...]


def judge(target: float, achieved: float, latencies: Sequence[float | None], rule: Rule) -> Verdict:
    """``latencies`` in creation order, ``None`` for a pod never released."""
    done = [x for x in latencies if x is not None]
    third = max(1, len(latencies) // 3)
    first = [x for x in latencies[:third] if x is not None]
    last = [x for x in latencies[-third:] if x is not None]
    p50, p99 = percentile(done, 50), percentile(done, 99)
    p99_first, p99_last = percentile(first, 99), percentile(last, 99)
    reasons: list[str] = []
    if achieved < rule.min_achieved * target:
        reasons.append(f"created {achieved:.1f}/s < {rule.min_achieved:.0%} of {target:g}/s")
    if len(done) < len(latencies):
        reasons.append(f"{len(latencies) - len(done)} pods not released")
    if not done or not p99_last <= rule.growth * max(p99_first, rule.floor_s):
        reasons.append(
            f"last third p99 {p99_last * 1000:.0f} ms > {rule.growth:g} x "
            f"max(first third {p99_first * 1000:.0f} ms, {rule.floor_s * 1000:.0f} ms)"
        )
    if not done or not p50 <= rule.max_p50_s:
        reasons.append(f"p50 {p50 * 1000:.0f} ms > {rule.max_p50_s * 1000:.0f} ms")
    return Verdict(
        target=target,
        achieved=achieved,
        pods=len(latencies),
        released=len(done),
        p50=p50,
        p99=p99,
        p99_first=p99_first,
        p99_last=p99_last,
        sustained=not reasons,
        reasons=tuple(reasons),
    )


def achieved_rate(created: list[float]) -> float:
    """Pods per second between the first and the last create returning (monotonic seconds)."""
    if len(created) < 2:
        return float("nan")
    span = max(created) - min(created)
    return (len(created) - 1) / span if span > 0 else float("inf")


def highest_sustained(steps: list[tuple[float, bool]]) -> float | None:
    """The highest rate sustained below the first rate that was not (rates in the order run)."""
    best: float | None = None
    for rate, ok in steps:
        if not ok:
            break
        best = rate
    return best
