"""bench/cpu_split.py, the CPU accounting of bench_ceiling: /proc stat parsing, per-pod arithmetic."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from bench import cpu_split
from bench.cpu_split import Snapshot

# After the command: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
STAT = "4242 (kube apiserver) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 12 0 999"


def test_stat_ticks_are_utime_plus_stime_even_with_parentheses_in_the_name() -> None:
    assert cpu_split.stat_cpu_ticks(STAT) == 300


def test_process_cpu_seconds_reads_a_proc_tree_and_none_for_a_gone_process(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "stat").write_text(STAT)
    assert cpu_split.process_cpu_seconds(4242, tmp_path) == pytest.approx(300 / os.sysconf("SC_CLK_TCK"))
    assert cpu_split.process_cpu_seconds(4243, tmp_path) is None
    snap = cpu_split.take({"api": 4242, "gone": 4243}, at=1.0, proc=tmp_path)
    assert set(snap.cpu) == {"api"}


def test_ms_per_pod_per_component_only_where_both_snapshots_have_it() -> None:
    before = Snapshot(10.0, {"api": 1.0, "etcd": 0.5, "emulator": 2.0})
    after = Snapshot(14.0, {"api": 3.0, "etcd": 0.9})  # the emulator exited meanwhile
    per_pod = cpu_split.ms_per_pod(before, after, 200)
    assert per_pod == pytest.approx({"api": 10.0, "etcd": 2.0})
    assert cpu_split.cores_busy(before, after) == pytest.approx({"api": 0.5, "etcd": 0.1})
    with pytest.raises(ValueError, match="pods must be positive"):
        cpu_split.ms_per_pod(before, after, 0)
    with pytest.raises(ValueError, match="time order"):
        cpu_split.cores_busy(after, before)


def test_rate_total_and_the_core_bound() -> None:
    assert cpu_split.rate(200, 4.0) == 50.0
    with pytest.raises(ValueError, match="seconds must be positive"):
        cpu_split.rate(200, 0.0)
    per_pod = {"client": 8.0, "kube-apiserver": 20.0, "etcd": 5.0}
    assert cpu_split.total(per_pod) == 33.0
    assert cpu_split.total(per_pod, ("kube-apiserver", "etcd", "emulator")) == 25.0
    # 2 cores = 2000 ms of CPU per second; 25 ms per pod -> at most 80 pods/s.
    assert cpu_split.ceiling(25.0, 2) == 80.0
    assert math.isinf(cpu_split.ceiling(0.0, 2))
