"""CPU accounting for bench/bench_ceiling.py: which process spent how much CPU per pod.

Pure arithmetic over ``/proc/<pid>/stat`` readings (utime + stime), kept apart from the cluster
code so it is unit-tested: a snapshot is {component: CPU seconds so far}; two snapshots and a pod
count give milliseconds of CPU per pod per component, and a total per pod bounds the rate a
machine of ``cores`` cores can reach (``cores`` x 1000 ms of CPU per second, divided by the ms one
pod needs), whatever any one component does.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


def stat_cpu_ticks(stat_text: str) -> int:
    """utime + stime (clock ticks) from the text of ``/proc/<pid>/stat``.

    The command name (field 2) is in parentheses and may contain spaces or ``)``: split after the
    last ``)``; utime and stime are fields 14 and 15, i.e. the 12th and 13th after it.
    """
    fields = stat_text.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """CPU seconds process ``pid`` has used (all its threads), or None if it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return None
    return stat_cpu_ticks(text) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Snapshot:
    """CPU seconds per component at one moment (``at``: a monotonic clock, seconds)."""

    at: float
    cpu: Mapping[str, float]


def take(pids: Mapping[str, int], at: float, proc: Path = Path("/proc")) -> Snapshot:
    """A snapshot of every component whose process still exists."""
    cpu = {name: s for name, pid in pids.items() if (s := process_cpu_seconds(pid, proc)) is not None}
    return Snapshot(at, cpu)


def ms_per_pod(before: Snapshot, after: Snapshot, pods: int) -> dict[str, float]:
    """Milliseconds of CPU per pod for each component present in both snapshots."""
    if pods <= 0:
        raise ValueError("pods must be positive")
    return {
        name: 1000.0 * (after.cpu[name] - before.cpu[name]) / pods for name in before.cpu if name in after.cpu
    }


def cores_busy(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Average cores each component kept busy between the snapshots (CPU seconds / wall seconds)."""
    wall = after.at - before.at
    if wall <= 0:
        raise ValueError("the snapshots must be in time order")
    return {name: (after.cpu[name] - before.cpu[name]) / wall for name in before.cpu if name in after.cpu}


def rate(pods: int, seconds: float) -> float:
    """Pods per second."""
    if seconds <= 0:
        raise ValueError("seconds must be positive")
    return pods / seconds


def ceiling(ms_per_pod_total: float, cores: int) -> float:
    """The highest pods/s ``cores`` cores can sustain if each pod needs ``ms_per_pod_total`` ms of CPU."""
    if ms_per_pod_total <= 0:
        return float("inf")
    return cores * 1000.0 / ms_per_pod_total


def total(per_pod: Mapping[str, float], names: tuple[str, ...] | None = None) -> float:
    """Sum of ``per_pod`` over ``names`` (all components if None; absent names count 0)."""
    return sum(per_pod.get(n, 0.0) for n in names) if names is not None else sum(per_pod.values())
