"""The hand-over of messages to the gate: the old per-product ``queue.Queue`` against the scheduler.

    .venv/bin/python -m bench.bench_handover --output bench/results/handover.md

In-process, no cluster: one producer thread (as the namespace's pod cache thread and the workers
are) hands ``--messages`` messages to one consumer thread, yielding the GIL every 50 messages as a
thread between socket reads would. "queue" is how the per-product controller loop took them before
(``Queue.put``; ``Queue.get(timeout)`` then up to 1,000 ``get_nowait``: a lock and a Condition per
message on both sides); "scheduler" is :class:`~metering_operator.gate.scheduler.Scheduler` (a
deque append, a wake-up only when the thread sleeps, a batch per wake-up). Reported: the process's
CPU time per message (both threads), wall time, and the scheduler's wake-ups. Run alternately,
``--rounds`` times each.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from bench.reporting import publish
from metering_operator.domain.clock import SystemClock
from metering_operator.gate.scheduler import Scheduler


def with_queue(n: int) -> tuple[float, float, int]:
    q: queue.Queue[tuple[int, int]] = queue.Queue()
    done = threading.Event()

    def consumer() -> None:
        got = 0
        while got < n:
            try:
                q.get(timeout=0.2)
            except queue.Empty:
                continue
            got += 1
            for _ in range(1000):
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
                got += 1
        done.set()

    thread = threading.Thread(target=consumer)
    thread.start()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        q.put((0, i))
        if i % 50 == 0:
            time.sleep(0)
    done.wait()
    thread.join()
    return time.process_time() - cpu, time.perf_counter() - wall, 0


class _Counter:
    def __init__(self, n: int) -> None:
        self.n, self.got, self.done = n, 0, threading.Event()

    def started(self) -> None:
        pass

    def receive(self, message: Any) -> None:
        self.got += 1
        if self.got == self.n:
            self.done.set()

    def due(self, key: Hashable) -> None:
        pass

    def stopped(self) -> None:
        pass


def with_scheduler(n: int) -> tuple[float, float, int]:
    scheduler = Scheduler(SystemClock(), name="bench-scheduler")
    owner = _Counter(n)
    scheduler.add(owner).result()
    wakeups = scheduler.wakeups
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        scheduler.post(owner, (0, i))
        if i % 50 == 0:
            time.sleep(0)
    owner.done.wait()
    result = time.process_time() - cpu, time.perf_counter() - wall, scheduler.wakeups - wakeups
    scheduler.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[tuple[float, float, int]]] = {"queue": [], "scheduler": []}
    load_start = os.getloadavg()[0]
    for _ in range(args.rounds):
        runs["queue"].append(with_queue(args.messages))
        runs["scheduler"].append(with_scheduler(args.messages))
    n = args.messages

    def med(name: str, i: int) -> float:
        return float(statistics.median(r[i] for r in runs[name]))

    q_cpu, s_cpu = med("queue", 0) / n * 1e6, med("scheduler", 0) / n * 1e6
    q_wall, s_wall = med("queue", 1), med("scheduler", 1)
    wakeups = med("scheduler", 2)
    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            "# Message hand-over to the gate: per-product queue vs the scheduler",
            "",
            f"- Command: `python -m bench.bench_handover {argv_text}`".rstrip(),
            f"- Machine: {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python "
            f"{sys.version.split()[0]}; 1-minute load {load_start:.1f} at the start (shared machine).",
            f"- {n:,} messages, one producer and one consumer thread, {args.rounds} rounds each, "
            "alternating; medians.",
            "",
            "| measure | unit | queue.Queue (before) | scheduler (now) | scheduler / queue |",
            "|---|---|---|---|---|",
            f"| CPU per message (both threads) | µs | {q_cpu:.2f} | {s_cpu:.2f} | {s_cpu / q_cpu:.2f} |",
            f"| wall time for all | s | {q_wall:.2f} | {s_wall:.2f} | {s_wall / q_wall:.2f} |",
            f"| scheduler wake-ups (messages per wake-up) | | - | {wakeups:.0f} "
            f"({n / max(wakeups, 1):.0f}) | |",
            "",
        ]
    )
    return publish(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
