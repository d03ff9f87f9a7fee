"""Benchmark: CPU and memory of hourly metering for 50 products x 4 dimensions over 2,000 pods.

Two parts, both written to one Markdown report:

* ``domain`` (always): the pure work of the metering cycle, in-process -- sampling the 4 sources
  from 2,000 pod views, ``tick`` + ``observe`` on each product's ledger, serialising status as
  the operator writes it, and closing hours into ledger entries with allocations. CPU time per
  cycle and per hour close, Python heap (tracemalloc) and the size of each product's status.
* ``cluster`` (``--cluster``): the real thing on the local control plane. 50 MeteredProducts in 5
  namespaces, each selecting a 40-replica Deployment (2,000 pods on KWOK fake nodes), the
  emulator as AWS and ``metering-operator run`` as a subprocess following the emulator clock.
  Measures the operator process's CPU (utime+stime from /proc) and RSS while it syncs, while it
  samples (steady state) and while it reports one hour for all 200 dimensions, plus status
  writes and MeterUsage calls.

Run from the repository root::

    .venv/bin/python -m bench.bench_metering --output bench/results/metering.md
    .venv/bin/python -m bench.bench_metering --cluster --output bench/results/metering.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from metering_operator.domain import ledger
from metering_operator.domain.aggregation import Aggregation, Rounding
from metering_operator.domain.product import LabelSelector, MeteredProductStatus, MeteringStatus
from metering_operator.domain.sampling import PodView, Source, TagRule, WorkloadView, measure

PRODUCTS = 50
PODS = 2000
NAMESPACES = 5
H0 = datetime(2031, 5, 6, 7, tzinfo=UTC)
DIMENSIONS = [
    ("replicas", Source.REPLICAS, Aggregation.AVERAGE, Rounding.UP, True),
    ("ready-pods", Source.READY_PODS, Aggregation.MAXIMUM, Rounding.UP, False),
    ("vcpu", Source.CPU_REQUESTS, Aggregation.AVERAGE, Rounding.DECIMAL, True),
    ("memory-gib", Source.MEMORY_REQUESTS_GIB, Aggregation.AVERAGE, Rounding.DECIMAL, False),
]
TEAMS = ("red", "green", "blue", "gold")


# ---------------------------------------------------------------------------------------------
# domain part


def _pods(product: int, count: int) -> list[PodView]:
    return [
        PodView(
            namespace=f"ns-{product % NAMESPACES}",
            name=f"p{product}-{i}",
            uid=f"uid-{product}-{i}",
            labels={"app": f"product-{product}", "team": TEAMS[i % len(TEAMS)]},
            ready=i % 10 != 0,
            terminating=False,
            bound=True,
            finished=False,
            cpu_cores=Decimal("0.25"),
            memory_bytes=Decimal(512 * 2**20),
            owned=True,
        )
        for i in range(count)
    ]


def bench_domain(hours: int, interval: int, trace: bool = False) -> dict[str, Any]:
    per_product = PODS // PRODUCTS
    selectors = [
        LabelSelector.model_validate({"matchLabels": {"app": f"product-{p}"}}) for p in range(PRODUCTS)
    ]
    pods = [_pods(p, per_product) for p in range(PRODUCTS)]
    workloads = [
        [
            WorkloadView(
                "Deployment",
                f"ns-{p % NAMESPACES}",
                f"d{p}",
                {"app": f"product-{p}", "team": "red"},
                per_product,
            )
        ]
        for p in range(PRODUCTS)
    ]
    rules = [ledger.DimensionRule(n, a, r) for n, _, a, r, _ in DIMENSIONS]
    tags = [TagRule("namespace", None), TagRule("team", "team")]
    policy = ledger.Policy()
    statuses = [MeteringStatus() for _ in range(PRODUCTS)]
    if trace:  # tracing slows Python down severalfold: heap is measured in a separate run
        tracemalloc.start()
    cycle_cpu: list[float] = []
    close_cpu: list[float] = []
    status_bytes: list[int] = []
    samples_per_hour = 3600 // interval
    for step in range(hours * samples_per_hour + 1):
        now = H0 + timedelta(seconds=step * interval)
        closing = step > 0 and step % samples_per_hour == 0
        started = time.process_time()
        for p in range(PRODUCTS):
            samples = {
                name: measure(source, selectors[p], pods[p], workloads[p], tags if alloc else ())
                for name, source, _, _, alloc in DIMENSIONS
            }
            status = ledger.tick(statuses[p], now, rules, policy, f"uid-{p}")
            status = ledger.observe(status, now, samples)
            for entry in ledger.due(status, now, policy):
                status = ledger.mark_sent(ledger.claim(status, entry, now), entry, "rec", now)
            status = ledger.prune(status, policy)
            wire = json.dumps(MeteredProductStatus(metering=status).to_kube())
            statuses[p] = status
            if p == 0:
                status_bytes.append(len(wire))
        elapsed = time.process_time() - started
        (close_cpu if closing else cycle_cpu).append(elapsed)
        # vary the load a little so values change (and status would be written)
        if step % 7 == 3:
            for p in range(PRODUCTS):
                pods[p][step % per_product] = _flip(pods[p][step % per_product])
    current, peak = tracemalloc.get_traced_memory() if trace else (0, 0)
    tracemalloc.stop()
    entries = sum(len(s.ledger) for s in statuses)
    return {
        "hours": hours,
        "interval": interval,
        "cycles": len(cycle_cpu),
        "closes": len(close_cpu),
        "cycle_cpu_ms_median": statistics.median(cycle_cpu) * 1000,
        "cycle_cpu_ms_p95": sorted(cycle_cpu)[int(len(cycle_cpu) * 0.95)] * 1000,
        "close_cpu_ms_median": statistics.median(close_cpu) * 1000 if close_cpu else 0.0,
        "cpu_share_at_60s": statistics.median(cycle_cpu) / 60 * 100,
        "heap_current_mib": current / 2**20,
        "heap_peak_mib": peak / 2**20,
        "status_bytes_max": max(status_bytes),
        "ledger_entries": entries,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _flip(pod: PodView) -> PodView:
    return PodView(**{**pod.__dict__, "ready": not pod.ready})


# ---------------------------------------------------------------------------------------------
# cluster part


def _code(product: int) -> str:
    return f"benchproduct{product:013d}"


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def _proc_mem(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _wait(what: str, probe: Callable[[], bool], timeout: float, log: Callable[[str], None]) -> float:
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(1.0)
    elapsed = time.monotonic() - started
    log(f"{what}: {elapsed:.1f}s")
    return elapsed


def bench_cluster(
    steady_seconds: float, interval: float, log: Callable[[str], None], operator_source: Path | None = None
) -> dict[str, Any]:
    """The cluster part; ``operator_source`` runs another tree's ``operator/`` (e.g. a worktree of
    the base commit) as the operator process, on the same cluster and harness."""
    import tempfile

    from devtools.cluster import LocalCluster
    from kubernetes import client, config
    from tests.e2e.conftest import BUYER_ACCOUNT, emulator_config, install_crd, launch_operator
    from tests.emulator.harness import start_emulator

    from metering_operator.domain.product import GROUP, PLURAL, VERSION

    local = LocalCluster()
    info, _ = local.acquire(os.getpid())
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core, apps, custom = client.CoreV1Api(api), client.AppsV1Api(api), client.CustomObjectsApi(api)
    work = Path(tempfile.mkdtemp(prefix="mmo-bench-metering-"))
    namespaces = [f"bench-metering-{i}" for i in range(NAMESPACES)]
    operator = None
    emulator = None
    try:
        install_crd(api)

        def namespaces_gone() -> bool:
            # A previous run's namespaces (deleted in its cleanup) must be gone, not terminating.
            existing = {n.metadata.name for n in core.list_namespace().items}
            return not existing.intersection(namespaces)

        _wait("previous benchmark namespaces deleted", namespaces_gone, 600, log)
        for ns in namespaces:
            try:
                core.create_namespace({"metadata": {"name": ns}})
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
        per_product = PODS // PRODUCTS
        for p in range(PRODUCTS):
            labels = {"app": f"product-{p}", "team": TEAMS[p % len(TEAMS)]}
            body = {
                "metadata": {"name": f"product-{p}"},
                "spec": {
                    "replicas": per_product,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {
                            "containers": [
                                {
                                    "name": "app",
                                    "image": "registry.invalid/app:1",
                                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                                }
                            ]
                        },
                    },
                },
            }
            apps.create_namespaced_deployment(namespaces[p % NAMESPACES], body)

        def all_ready() -> bool:
            total = 0
            for ns in namespaces:
                total += sum(
                    (d.status.ready_replicas or 0) for d in apps.list_namespaced_deployment(ns).items
                )
            return total >= PODS

        pods_ready_s = _wait(f"{PODS} pods Ready on fake nodes", all_ready, 900, log)
        emulator = start_emulator(
            emulator_config(
                info,
                # One listing per MeteredProduct: AWS keys records by product code, caller,
                # dimension and hour, so products sharing a code would collide.
                products=[
                    {
                        "productCode": _code(p),
                        "dimensions": [{"name": d[0]} for d in DIMENSIONS],
                        "entitledAccounts": [BUYER_ACCOUNT],
                    }
                    for p in range(PRODUCTS)
                ],
                staticCredentials=[
                    {
                        "accessKeyId": "AKIABENCHMETERING0001",
                        "secretAccessKey": "bench",
                        "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/bench",
                    }
                ],
            ),
            work / "emulator",
        )
        emulator.admin.set_clock(H0)
        operator = launch_operator(
            info,
            namespaces,
            emulator,
            work / "operator.log",
            webhook=False,
            extra_args=[
                "--sample-interval-seconds",
                str(interval),
                "--emulator-clock-url",
                emulator.url,
                "--operator-namespace",
                namespaces[0],
                "--lease-duration-seconds",
                "5",
            ],
            extra_env={
                "AWS_ACCESS_KEY_ID": "AKIABENCHMETERING0001",
                "AWS_SECRET_ACCESS_KEY": "bench",
                **({"PYTHONPATH": str(operator_source / "operator")} if operator_source else {}),
            },
        )
        operator.wait_ready(120)
        pid = operator.process.pid
        # Baseline: the operator idle next to the 2,000 pods, before any product exists.
        time.sleep(10)
        rss_idle, _ = _proc_mem(pid)
        cpu_idle0 = _proc_cpu(pid)
        time.sleep(20)
        cpu_idle = _proc_cpu(pid) - cpu_idle0
        log(f"idle operator: RSS {rss_idle:.0f} MiB, CPU {cpu_idle:.2f} s over 20 s")
        for p in range(PRODUCTS):
            dims = []
            for name, source, aggregation, rounding, alloc in DIMENSIONS:
                dim: dict[str, Any] = {
                    "name": name,
                    "source": source.value,
                    "aggregation": aggregation.value,
                    "rounding": rounding.value,
                }
                if alloc:
                    dim["allocations"] = {
                        "tags": [
                            {"key": "namespace", "from": "Namespace"},
                            {"key": "team", "fromLabel": "team"},
                        ]
                    }
                dims.append(dim)
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                namespaces[p % NAMESPACES],
                PLURAL,
                {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "MeteredProduct",
                    "metadata": {"name": f"product-{p}"},
                    "spec": {
                        "productCode": _code(p),
                        "publicKeyVersion": 1,
                        "selector": {"matchLabels": {"app": f"product-{p}"}},
                        "entitlement": {"mode": "Off"},
                        "metering": {"dimensions": dims},
                    },
                },
            )

        def products() -> list[dict[str, Any]]:
            items: list[dict[str, Any]] = []
            for ns in namespaces:
                items.extend(custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"])
            return items

        def all_sampling() -> bool:
            ok = 0
            for item in products():
                open_hour = ((item.get("status") or {}).get("metering") or {}).get("openHour") or {}
                dims = open_hour.get("dimensions") or []
                ok += len(dims) == 4 and all(d.get("samples") for d in dims)
            return ok == PRODUCTS

        cpu0 = _proc_cpu(pid)
        sync_s = _wait("operator sampling all 50 products", all_sampling, 300, log)
        cpu_sync = _proc_cpu(pid) - cpu0
        rss_sync, _ = _proc_mem(pid)

        cpu1 = _proc_cpu(pid)
        time.sleep(steady_seconds)
        cpu_steady = _proc_cpu(pid) - cpu1
        rss_steady, _ = _proc_mem(pid)

        def entries_sent() -> bool:
            sent = 0
            for item in products():
                for entry in ((item.get("status") or {}).get("metering") or {}).get("ledger") or []:
                    sent += entry.get("state") == "Sent" and entry.get("hour") == "2031-05-06T07:00:00Z"
            return sent == PRODUCTS * len(DIMENSIONS)

        cpu2 = _proc_cpu(pid)
        emulator.admin.set_clock(H0 + timedelta(hours=1))
        report_s = _wait("200 dimension-hours Sent", entries_sent, 600, log)
        cpu_report = _proc_cpu(pid) - cpu2
        rss_end, hwm = _proc_mem(pid)
        # Hourly records only: the DryRun permission checks (one per dimension at start) record nothing.
        calls = [
            e
            for e in emulator.admin.events(operation="MeterUsage")
            if not (e.get("requestParameters") or {}).get("DryRun")
        ]
        records = emulator.admin.meter_records()
        metrics = operator.metrics()
        return {
            "rss_idle_mib": rss_idle,
            "cpu_idle_s": cpu_idle,
            "pods_ready_s": pods_ready_s,
            "interval": interval,
            "sync_s": sync_s,
            "cpu_sync_s": cpu_sync,
            "steady_s": steady_seconds,
            "cpu_steady_s": cpu_steady,
            "cpu_steady_share": cpu_steady / steady_seconds * 100,
            "cycles_steady": steady_seconds / interval * PRODUCTS,
            "cpu_per_product_cycle_ms": cpu_steady / (steady_seconds / interval * PRODUCTS) * 1000,
            "report_s": report_s,
            "cpu_report_s": cpu_report,
            "rss_sync_mib": rss_sync,
            "rss_steady_mib": rss_steady,
            "rss_end_mib": rss_end,
            "rss_peak_mib": hwm,
            "meter_calls": len(calls),
            "records": len(records),
            "ledger_metric": [
                line
                for line in metrics.splitlines()
                if line.startswith("marketplace_metering_ledger_entries{") and "Sent" in line
            ][:1],
        }
    finally:
        if operator is not None:
            operator.stop()
        if emulator is not None:
            emulator.stop()
        for ns in namespaces:
            for item in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, item["metadata"]["name"], {"metadata": {"finalizers": None}}
                )
            with contextlib.suppress(client.ApiException):
                core.delete_namespace(ns)
        api.close()
        local.release(os.getpid(), keep=os.environ.get("MMO_KEEP_CLUSTER") == "1")


# ---------------------------------------------------------------------------------------------


def _table(rows: list[tuple[str, str]]) -> list[str]:
    return ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def report(domain: dict[str, Any], cluster: dict[str, Any] | None, command: str) -> str:
    d = domain
    lines = [
        "# Metering benchmark: 50 products x 4 dimensions over 2,000 pods",
        "",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work while measured), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        "",
        "## Domain (pure, in-process)",
        "",
        "One cycle = for each of the 50 products: sample 4 sources from its 40 pods (2 with allocation "
        "tags namespace+team), `tick` + `observe`, send due entries, `prune`, serialise status. "
        f"{d['hours']} simulated hours at {d['interval']} s.",
        "",
        *_table(
            [
                ("CPU per cycle (all 50 products), median", f"{d['cycle_cpu_ms_median']:.1f} ms"),
                ("CPU per cycle, p95", f"{d['cycle_cpu_ms_p95']:.1f} ms"),
                (
                    "CPU per hour-close cycle (200 entries, allocations), median",
                    f"{d['close_cpu_ms_median']:.1f} ms",
                ),
                ("CPU share of one core at a 60 s interval", f"{d['cpu_share_at_60s']:.2f} %"),
                (
                    "Python heap of 50 products' state after 1 h / peak (tracemalloc run)",
                    f"{d['heap_current_mib']:.1f} / {d['heap_peak_mib']:.1f} MiB",
                ),
                ("Largest status.metering of a product (JSON)", f"{d['status_bytes_max']} bytes"),
                ("Ledger entries held (all products)", str(d["ledger_entries"])),
                ("Benchmark process max RSS", f"{d['max_rss_mib']:.0f} MiB"),
            ]
        ),
    ]
    if cluster:
        c = cluster
        lines += [
            "",
            "## Cluster (operator process, local control plane, KWOK pods, emulator)",
            "",
            f"50 MeteredProducts in {NAMESPACES} namespaces, each selecting a 40-replica Deployment "
            "(2,000 Ready pods, 10m CPU and 16Mi requested each), sampled every "
            f"{c['interval']} s (the product default is 60 s). Each product has its own product code "
            "(AWS keys records by product code, caller, dimension and hour). The operator process is "
            "the whole `metering-operator run` (entitlement handlers included, idle here: mode Off); "
            "the idle row is the same process before the products exist, so the difference is the "
            "cost of metering.",
            "",
            *_table(
                [
                    ("2,000 pods Ready (setup, not the operator)", f"{c['pods_ready_s']:.0f} s"),
                    (
                        "operator idle, before any MeteredProduct: RSS / CPU over 20 s",
                        f"{c['rss_idle_mib']:.0f} MiB / {c['cpu_idle_s']:.2f} s",
                    ),
                    (
                        "start -> all 50 products sampling (informers synced)",
                        f"{c['sync_s']:.1f} s, CPU {c['cpu_sync_s']:.2f} s",
                    ),
                    (
                        f"steady sampling: CPU over {c['steady_s']:.0f} s",
                        f"{c['cpu_steady_s']:.2f} s ({c['cpu_steady_share']:.1f} % of a core)",
                    ),
                    (
                        "CPU per product-cycle (read, sample 4 dims, maybe write)",
                        f"{c['cpu_per_product_cycle_ms']:.1f} ms",
                    ),
                    (
                        "hour close -> 200 dimension-hours Sent",
                        f"{c['report_s']:.1f} s, CPU {c['cpu_report_s']:.2f} s",
                    ),
                    (
                        "RSS after sync / steady / end / peak",
                        f"{c['rss_sync_mib']:.0f} / {c['rss_steady_mib']:.0f} / {c['rss_end_mib']:.0f} / "
                        f"{c['rss_peak_mib']:.0f} MiB",
                    ),
                    ("MeterUsage calls / emulator records", f"{c['meter_calls']} / {c['records']}"),
                ]
            ),
        ]
    return "\n".join(lines) + "\n"


def compare(bases: list[dict[str, Any]], runs: list[dict[str, Any]], tree: Path) -> str:
    """Both operators side by side (medians over the alternating runs), same cluster, same run."""
    rows = [
        ("CPU per product-cycle (ms)", "cpu_per_product_cycle_ms", "{:.1f}"),
        ("steady sampling CPU (s)", "cpu_steady_s", "{:.2f}"),
        ("hour close -> 200 Sent, wall (s)", "report_s", "{:.1f}"),
        ("hour close CPU (s)", "cpu_report_s", "{:.2f}"),
        ("start -> all sampling (s)", "sync_s", "{:.1f}"),
        ("RSS steady (MiB)", "rss_steady_mib", "{:.0f}"),
        ("MeterUsage calls", "meter_calls", "{}"),
    ]
    lines = [
        "",
        f"## Against the base commit (operator from `{tree}`; {len(bases)} run(s) each, alternating, "
        "base first, same cluster; medians, each run's value in brackets)",
        "",
        "| measure | base | this | ratio this/base |",
        "|---|---|---|---|",
    ]
    for label, key, fmt in rows:
        b = statistics.median(r[key] for r in bases)
        n = statistics.median(r[key] for r in runs)
        ratio = f"{n / b:.2f}" if b else "-"
        each_b = ", ".join(fmt.format(r[key]) for r in bases)
        each_n = ", ".join(fmt.format(r[key]) for r in runs)
        lines.append(f"| {label} | {fmt.format(b)} [{each_b}] | {fmt.format(n)} [{each_n}] | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=int, default=3)
    parser.add_argument("--interval", type=int, default=60, help="domain part: sampling interval (s)")
    parser.add_argument("--cluster", action="store_true", help="also run the cluster part")
    parser.add_argument("--cluster-interval", type=float, default=10.0)
    parser.add_argument("--steady-seconds", type=float, default=60.0)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="cluster part: first run the operator from this tree (e.g. `git worktree add` of the base "
        "commit), then this one, in the same run, and report both with ratios",
    )
    parser.add_argument("--repeat", type=int, default=1, help="with --baseline: alternating runs of each")
    args = parser.parse_args(argv)
    # Background jobs ignore SIGINT; make SIGTERM unwind through the cleanup in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(message: str) -> None:
        print(f"[bench-metering {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    log("domain part")
    domain = bench_domain(args.hours, args.interval)
    traced = bench_domain(1, args.interval, trace=True)
    domain["heap_current_mib"], domain["heap_peak_mib"] = traced["heap_current_mib"], traced["heap_peak_mib"]
    log(json.dumps(domain))
    cluster = None
    bases: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    if args.cluster:
        # With a baseline, the two operators alternate (base, this, base, this, ...) on the same
        # cluster, so drift in the shared machine's load hits both alike.
        for _ in range(args.repeat if args.baseline else 1):
            if args.baseline:
                log(f"cluster part, baseline operator from {args.baseline}")
                bases.append(bench_cluster(args.steady_seconds, args.cluster_interval, log, args.baseline))
                log(json.dumps(bases[-1], default=str))
            log("cluster part")
            runs.append(bench_cluster(args.steady_seconds, args.cluster_interval, log))
            log(json.dumps(runs[-1], default=str))
        cluster = runs[-1]
    text = report(domain, cluster, "python -m bench.bench_metering " + " ".join(argv or sys.argv[1:]))
    if bases and runs:
        text += compare(bases, runs, args.baseline)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
