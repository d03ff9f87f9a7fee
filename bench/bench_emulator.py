"""Benchmark: Metering calls through unmodified boto3 against the local emulator.

Measures, through ``metering_operator.aws`` (a thin layer over boto3):

* STS ``AssumeRoleWithWebIdentity`` latency (one exchange per simulated pod),
* the cost of a Metering client per pod (shared botocore session vs a fresh ``boto3.Session``),
* RegisterUsage and MeterUsage requests per second, sequentially and with a small thread pool:
  first calls (one new registration / one new record per pod) and steady replays (the same
  pod calling again, which AWS answers idempotently).

The emulator is a real subprocess on loopback, so the numbers are the client's plus the
emulator's cost on this machine, not AWS's. Run from the repository root:

    .venv/bin/python -m bench.bench_emulator --output bench/results/emulator.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore
from tests.emulator.harness import TestIssuer, start_emulator

from metering_operator.aws.client import MeteringClient, MeteringClientFactory
from metering_operator.aws.irsa import WebIdentityCredentials, WebIdentityExchanger, session_name_for_pod
from metering_operator.aws.models import MeterUsageRequest, RegisterUsageRequest
from metering_operator.domain.clock import hour_start

REGION = "eu-bench-1"  # made up on purpose: nothing may depend on a real Region
ACCOUNT = "111111111111"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/bench-pods"
HOURLY = "benchhourly1"
CUSTOM = "benchcustom1"


@dataclass
class Series:
    """Per-call latencies of one measurement and the wall time it took."""

    name: str
    latencies: list[float]
    wall: float
    threads: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall if self.wall > 0 else float("nan")

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return ordered[index]

    def row(self) -> str:
        ms = [1000 * self.pct(q) for q in (0.5, 0.95, 0.99)]
        mean = 1000 * statistics.fmean(self.latencies)
        return (
            f"| {self.name} | {self.threads} | {len(self.latencies)} | {self.rate:,.0f} | "
            f"{mean:.2f} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} |"
        )


def timed(name: str, calls: Sequence[Callable[[], Any]], threads: int) -> Series:
    """Run ``calls`` (sequentially if threads == 1) and time each one and the whole."""
    latencies: list[float] = []

    def one(call: Callable[[], Any]) -> float:
        started = time.perf_counter()
        call()
        return time.perf_counter() - started

    started = time.perf_counter()
    if threads == 1:
        latencies = [one(call) for call in calls]
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            latencies = list(pool.map(one, calls))
    return Series(name, latencies, time.perf_counter() - started, threads)


def config(issuer: TestIssuer) -> dict[str, Any]:
    return {
        "region": REGION,
        "products": [
            {"productCode": HOURLY, "entitledAccounts": [ACCOUNT]},
            {"productCode": CUSTOM, "dimensions": ["replicas"], "entitledAccounts": [ACCOUNT]},
        ],
        "roles": [
            {"arn": ROLE, "trust": [{"issuer": issuer.issuer, "subjects": ["system:serviceaccount:bench:*"]}]}
        ],
        "issuers": [issuer.issuer_config()],
    }


def run(pods: int, replays: int, threads: int, workdir: Path) -> tuple[list[Series], dict[str, float]]:
    issuer = TestIssuer(workdir / "issuer")
    emulator = start_emulator(config(issuer), workdir / "state")
    try:
        exchanger = WebIdentityExchanger(REGION, endpoint_url=emulator.url)
        factory = MeteringClientFactory(REGION, endpoint_url=emulator.url)
        uids = [str(uuid.uuid4()) for _ in range(2 * pods)]
        tokens = {uid: issuer.token("bench", "app", pod_name=f"p-{uid[:8]}", pod_uid=uid) for uid in uids}
        creds: dict[str, WebIdentityCredentials] = {}

        def exchange(uid: str) -> Callable[[], Any]:
            def call() -> None:
                creds[uid] = exchanger.assume(ROLE, tokens[uid], session_name=session_name_for_pod(uid))

            return call

        seq_uids, pool_uids = uids[:pods], uids[pods:]
        series = [
            timed("STS AssumeRoleWithWebIdentity", [exchange(u) for u in seq_uids], 1),
            timed("STS AssumeRoleWithWebIdentity", [exchange(u) for u in pool_uids], threads),
        ]

        # Client construction per pod: what the operator pays before the first RegisterUsage.
        factory.for_credentials(creds[uids[0]])  # builds the one shared client
        shared = timed(
            "client per pod, view of the shared client",
            [lambda: factory.for_credentials(creds[uids[0]])] * 50,
            1,
        )
        fresh = timed(
            "client per pod, new boto3.Session",
            [lambda: creds[uids[0]].metering_client(REGION, endpoint_url=emulator.url)] * 20,
            1,
        )
        client_cost = {"shared_ms": 1000 * shared.pct(0.5), "fresh_ms": 1000 * fresh.pct(0.5)}

        clients: dict[str, MeteringClient] = {uid: factory.for_credentials(creds[uid]) for uid in uids}
        hour = hour_start(emulator.admin.clock()) - timedelta(hours=1)

        def register(uid: str) -> Callable[[], Any]:
            request = RegisterUsageRequest(product_code=HOURLY, public_key_version=1, nonce=uid)
            return lambda: clients[uid].register_usage(request)

        def meter(uid: str) -> Callable[[], Any]:
            request = MeterUsageRequest(
                product_code=CUSTOM, timestamp=hour, usage_dimension="replicas", usage_quantity=3
            )
            return lambda: clients[uid].meter_usage(request)

        # Each workload runs sequentially (its own pods) and then from a thread pool (other pods),
        # so "first call per pod" really is every pod's first call.
        workloads: dict[str, Callable[[list[str]], list[Callable[[], Any]]]] = {
            "RegisterUsage, first call per pod": lambda uids: [register(u) for u in uids],
            "RegisterUsage, repeat calls": lambda uids: [register(uids[i % pods]) for i in range(replays)],
            "MeterUsage, new record per pod": lambda uids: [meter(u) for u in uids],
            "MeterUsage, idempotent replays": lambda uids: [meter(uids[i % pods]) for i in range(replays)],
        }
        for name, calls in workloads.items():
            series += [timed(name, calls(seq_uids), 1), timed(name, calls(pool_uids), threads)]
        # Sanity: the emulator saw what we think we sent (a benchmark of failures is worthless).
        registrations = emulator.admin.registrations(HOURLY)
        records = emulator.admin.meter_records(CUSTOM)
        if len(registrations) != 2 * pods or len(records) != 2 * pods:
            raise RuntimeError(
                f"expected {2 * pods} registrations and records, got {len(registrations)}, {len(records)}"
            )
        return series, client_cost
    finally:
        emulator.stop()


def report(series: list[Series], client_cost: dict[str, float], argv: Sequence[str]) -> str:
    lines = [
        "# Emulator benchmark: Metering + STS through boto3",
        "",
        f"- machine: {os.cpu_count()} CPUs (`nproc`: {len(os.sched_getaffinity(0))}), {platform.platform()}",
        f"- python {platform.python_version()}, boto3 {boto3.__version__}, botocore {botocore.__version__}",
        f"- command: `.venv/bin/python -m bench.bench_emulator {' '.join(argv)}`".replace("  ", " "),
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "- client and emulator share the machine (loopback HTTP, emulator = one aiohttp process); "
        f"1-minute load average at the end: {os.getloadavg()[0]:.2f}",
        "",
        "| measurement | threads | calls | calls/s | mean ms | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|---|---|",
        *[s.row() for s in series],
        "",
        "Metering client construction per pod (p50): "
        f"{client_cost['shared_ms']:.2f} ms for a view of the one shared client that signs each call "
        "with the pod's credentials (`MeteringClientFactory.for_credentials`), "
        f"{client_cost['fresh_ms']:.2f} ms with a new `boto3.Session` each time.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pods", type=int, default=200, help="simulated pods per series (default 200)")
    parser.add_argument(
        "--replays", type=int, default=1000, help="repeat calls per replay series (default 1000)"
    )
    parser.add_argument("--threads", type=int, default=4, help="thread-pool size for the parallel series")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown report here too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-emulator-") as tmp:
        series, client_cost = run(args.pods, args.replays, args.threads, Path(tmp))
    text = report(series, client_cost, list(argv if argv is not None else sys.argv[1:]))
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
