"""Side by side: threads and idle CPU of the operator with N products and no pods, base vs this tree.

    .venv/bin/python -m bench idle --base c4c11f7 --rounds 1 --output bench/results/idle.md

Same worktree machinery as bench/compare_entitlement.py (the base commit as a detached worktree
under ``.local/bench-base/``, run with this interpreter; base and new alternate, A1 B1 A2 B2 ...).
Per run, two operator processes, each watching one fresh namespace that holds ``--products``
MeteredProducts (default 50) and no pods:

1. **gate** -- the products in Enforce mode (an inline public key, each selecting its own
   ``app=product-<p>`` label, which no pod has), no metering dimensions;
2. **gate + metering** -- the same products, each also metering one dimension, sampling every
   ``--interval`` seconds (default 60: one cycle per product in the measured minute).

Once every product's status has been written (the operator has looked at all of them) and
``--settle`` seconds have passed, the process is left alone for ``--seconds`` (default 60) and
measured: its CPU time (utime + stime from ``/proc/<pid>/stat``), its thread count
(``/proc/<pid>/task``), its voluntary context switches summed over its threads (each one a thread
going to sleep: a measure of wake-ups) and its VmRSS.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from devtools.cluster import ClusterInfo
from kubernetes import client
from tests.e2e.conftest import BUYER_ACCOUNT, OperatorProcess, emulator_config, install_crd, launch_operator
from tests.emulator.harness import EmulatorProcess, start_emulator

from bench.compare_entitlement import (
    Variant,
    base_variant,
    install_variant_crd,
    new_variant,
    wait_namespace_gone,
)
from bench.compare_memory import remove_all_products, rss_mib, threads, wait
from bench.machine_facts import machine_facts
from bench.reporting import command_line, open_session, publish
from metering_operator.domain.product import GROUP, PLURAL, VERSION

H0 = datetime(2031, 5, 6, 7, tzinfo=UTC)
DIMENSION = {"name": "vcpu", "source": "CPURequests", "aggregation": "Average", "rounding": "Decimal"}
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def code(product: int) -> str:
    return f"benchidle{product:016d}"


def cpu_seconds(pid: int) -> float:
    # Fields after the command name (which may hold spaces, so split after its ')'): utime, stime
    # are the 12th and 13th of those (14 and 15 of the whole line).
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def voluntary_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def measure(pid: int, seconds: float) -> dict[str, float]:
    cpu0, sw0, t0 = cpu_seconds(pid), voluntary_switches(pid), time.monotonic()
    time.sleep(seconds)
    cpu1, sw1, t1 = cpu_seconds(pid), voluntary_switches(pid), time.monotonic()
    elapsed = t1 - t0
    return {
        "cpu_ms_per_s": (cpu1 - cpu0) * 1000 / elapsed,
        "switches_per_s": (sw1 - sw0) / elapsed,
        "threads": float(threads(pid)),
        "rss": rss_mib(pid),
    }


def product_body(p: int, pem: str, metering: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "productCode": code(p),
        "publicKeyVersion": 1,
        "publicKey": {"pem": pem},
        "selector": {"matchLabels": {"app": f"product-{p}"}},
        "entitlement": {"mode": "Enforce"},
    }
    if metering:
        spec["metering"] = {"dimensions": [DIMENSION]}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": f"p{p}"},
        "spec": spec,
    }


def all_statused(custom: client.CustomObjectsApi, namespace: str, n: int) -> Callable[[], bool]:
    def probe() -> bool:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
        return sum(1 for i in items if (i.get("status") or {}).get("conditions")) >= n

    return probe


def phase(
    variant: Variant,
    args: argparse.Namespace,
    api: client.ApiClient,
    info: ClusterInfo,
    emulator: EmulatorProcess,
    pem: str,
    work: Path,
    tag: str,
    metering: bool,
) -> dict[str, float]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = str(core.create_namespace({"metadata": {"generateName": "bench-idle-"}}).metadata.name)
    for p in range(args.products):
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, product_body(p, pem, metering))
    extra = [
        "--sample-interval-seconds",
        str(args.interval),
        "--emulator-clock-url",
        emulator.url,
        "--lease-duration-seconds",
        "15",
        "--operator-namespace",
        ns,
    ]
    run_py = (variant.root / "operator" / "metering_operator" / "commands" / "run.py").read_text()
    env = {"PYTHONPATH": str(variant.root / "operator")}
    name = "metering" if metering else "gate"
    op: OperatorProcess = launch_operator(
        info,
        ns,
        emulator,
        work / f"operator-{tag.lower()}-{name}.log",
        extra_env=env,
        extra_args=extra,
        policies="--admission-policies" not in run_py,
    )
    try:
        op.wait_ready(120)
        wait(f"all {args.products} products' status written", all_statused(custom, ns, args.products), 300)
        time.sleep(args.settle)
        out = measure(op.pid, args.seconds)
    finally:
        op.stop()
        remove_all_products(custom, [ns])
        wait_namespace_gone(core, ns)
    print(f"  {tag} {name}: {out}", flush=True)
    return out


def render(r: dict[str, Any]) -> str:
    def values(variant: str, ph: str, key: str) -> list[float]:
        return [run[ph][key] for run in r["runs"] if run["variant"] == variant]

    loads = ", ".join(f"{run['tag']} {run['load_start']:.1f}->{run['load_end']:.1f}" for run in r["runs"])
    lines = [
        f"## Idle operator with {r['products']} products and no pods: base and this tree side by side",
        "",
        f"- Command: `{r['command']}`",
        f"- Machine: {r['machine']}, Python {r['python']}; `nproc` {r['nproc']}. Cluster (kube-apiserver,",
        "  etcd, KWOK), emulator and the operator share it; other engineers' work ran on it too.",
        f"- Base: `{r['base']}` (a git worktree, run from its source root with this interpreter);",
        f"  new: `{r['new']}`.",
        f"- Order (alternating): {' '.join(run['tag'] for run in r['runs'])}. 1-minute load average at "
        f"the start -> end of each run: {loads}.",
        f"- gate: {r['products']} Enforce products (inline key, own selector, no pods), no metering. "
        f"gate + metering: the same, each metering one dimension every {r['interval']} s. Measured over "
        f"{r['seconds']:.0f} s of idle, {r['settle']:.0f} s after every product's status was written.",
        "",
        "| measure | unit | base: median (each run) | new: median (each run) | new / base |",
        "|---|---|---|---|---|",
    ]
    for ph, label in (("gate", "gate"), ("metering", "gate + metering")):
        for key, measure_name, unit in (
            ("threads", "threads", ""),
            ("cpu_ms_per_s", "CPU", "ms/s"),
            ("switches_per_s", "voluntary context switches", "/s"),
            ("rss", "RSS", "MiB"),
        ):
            b, n = values("base", ph, key), values("new", ph, key)
            bm, nm = statistics.median(b), statistics.median(n)
            ratio = f"{nm / bm:.2f}" if bm else "-"
            lines.append(
                f"| {measure_name}, {label} | {unit} | {bm:.1f} ({' / '.join(f'{v:.1f}' for v in b)}) | "
                f"{nm:.1f} ({' / '.join(f'{v:.1f}' for v in n)}) | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="commit to compare with (e.g. c4c11f7)")
    parser.add_argument("--rounds", type=int, default=1, help="base/new pairs, run alternately")
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument("--interval", type=int, default=60, help="metering sample interval (s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="idle time measured")
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = command_line("python -m bench idle", argv)
    variants = [base_variant(args.base), new_variant()]
    results: dict[str, Any] = {
        "command": command,
        **machine_facts(),
        "base": variants[0].commit,
        "new": variants[1].commit,
        **{k: getattr(args, k) for k in ("products", "interval", "seconds", "settle")},
        "runs": [],
    }
    cluster, info, api, work = open_session("bench-idle-")
    emulator: EmulatorProcess | None = None
    try:
        install_crd(api)
        base_config = emulator_config(info)
        products = [
            {"productCode": code(p), "dimensions": [{"name": "vcpu"}], "entitledAccounts": [BUYER_ACCOUNT]}
            for p in range(args.products)
        ]
        emulator = start_emulator(
            emulator_config(info, products=[*base_config["products"], *products]), work / "emulator"
        )
        emulator.admin.set_clock(H0)
        pem = emulator.admin.public_key_pem(base_config["products"][0]["productCode"], 1)
        for round_index in range(args.rounds):
            for variant in variants:
                tag = f"{'AB'[variants.index(variant)]}{round_index + 1}"
                print(f"== {tag}: {variant.name} {variant.commit}", flush=True)
                install_variant_crd(api, variant)
                run: dict[str, Any] = {"variant": variant.name, "tag": tag, "load_start": os.getloadavg()[0]}
                run["gate"] = phase(variant, args, api, info, emulator, pem, work, tag, metering=False)
                run["metering"] = phase(variant, args, api, info, emulator, pem, work, tag, metering=True)
                run["load_end"] = os.getloadavg()[0]
                results["runs"].append(run)
    finally:
        if emulator is not None:
            emulator.stop()
        cluster.release(os.getpid(), keep=True)
    report = render(results)
    return publish(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
