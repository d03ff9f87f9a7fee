"""Benchmark: the entitlement gate with the admission policies installed, next to without, in one run.

Runs bench_entitlement's phases twice on the same machine, one after the other: first as before
(the operator's webhook adds the gate, no admission policies), then as the chart installs it on
Kubernetes >= 1.36 (the operator as a ServiceAccount; a MutatingAdmissionPolicy adds the gate; the
ValidatingAdmissionPolicies check every pod and workload write, the operator's own included). Writes
both side by side with ratios (with / without).

    .venv/bin/python -m bench.bench_policies --output bench/results/policies.md
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench import bench_entitlement


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steady-rate", type=float, default=20.0)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=30)
    parser.add_argument("--unrelated", type=int, default=200)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    runs: dict[str, dict[str, Any]] = {}
    for label, policies in (("without", False), ("with", True)):
        print(f"===== {label} admission policies", flush=True)
        runs[label] = bench_entitlement.run(argparse.Namespace(**{**vars(args), "policies": policies}))
    command = " ".join(["python -m bench.bench_policies", *(argv if argv is not None else sys.argv[1:])])
    report = render(runs, command)
    print(report)
    if args.output:
        args.output.write_text(report)
    return 0


def _row(name: str, without: float, with_: float, unit: str, fmt: str = "{:.0f}") -> str:
    ratio = with_ / without if without else float("nan")
    return f"| {name} | {fmt.format(without)} {unit} | {fmt.format(with_)} {unit} | {ratio:.2f}x |"


def render(runs: dict[str, dict[str, Any]], command: str) -> str:
    a, b = runs["without"], runs["with"]
    ms = 1000.0
    rows = [
        _row("steady gate latency p50", a["steady"]["p50"] * ms, b["steady"]["p50"] * ms, "ms"),
        _row("steady gate latency p95", a["steady"]["p95"] * ms, b["steady"]["p95"] * ms, "ms"),
        _row("steady gate latency p99", a["steady"]["p99"] * ms, b["steady"]["p99"] * ms, "ms"),
        _row("burst pods/s", a["burst"]["pods_per_second"], b["burst"]["pods_per_second"], "", "{:.1f}"),
        _row(
            "backlog pods/s", a["backlog"]["pods_per_second"], b["backlog"]["pods_per_second"], "", "{:.1f}"
        ),
        _row(
            "burst: create calls took",
            a["burst"]["create_seconds"],
            b["burst"]["create_seconds"],
            "s",
            "{:.1f}",
        ),
        _row(
            "operator CPU per pod (steady)",
            a["steady"]["cpu_ms_per_pod"],
            b["steady"]["cpu_ms_per_pod"],
            "ms",
        ),
    ]
    exact = [
        _row(f"{phase}: {what}", a[phase][key], b[phase][key], "", "{:.2f}")
        for phase in ("steady", "burst", "backlog")
        for what, key in (
            ("pod writes per pod", "writes_per_pod"),
            ("RegisterUsage per pod", "register_per_pod"),
        )
    ]
    return f"""# Entitlement gate: with the admission policies next to without

- Machine: {a["machine"]}, Python {a["python"]}. Both runs one after the other in one process, on the
  same local cluster, emulator and machine: `{command}`.
- Without: the operator's webhook (local mode) adds the gate; no admission policies; the operator runs
  with the admin kubeconfig (today's path).
- With: as the chart installs it on Kubernetes >= 1.36: the operator runs as a ServiceAccount, its
  MutatingAdmissionPolicy adds the gate (no webhook), and the ValidatingAdmissionPolicies check every
  pod and workload write (`pod-records`, `product-pods` per MeteredProduct, `workload-records`,
  `cronjob-records`, and `operator` on the operator's own writes).
- Load: the machine is shared by five engineers' clusters and tests (2 cores). 1-minute load average
  without: {a["load_start"]:.1f} -> {a["load_end"]:.1f}; with: {b["load_start"]:.1f} -> {b["load_end"]:.1f}.
  Above ~2 every component waits for CPU; compare the two columns, not the absolute numbers.

| measure | without policies | with policies | with / without |
|---|---|---|---|
{chr(10).join(rows)}

Exactness (both must be 1 RegisterUsage per pod, and the same writes):

| measure | without | with | ratio |
|---|---|---|---|
{chr(10).join(exact)}

Steady: {a["steady"]["pods"]} pods; burst and backlog: {a["burst"]["pods"]} pods each.
The backlog rate is the operator's own throughput (pods already gated before it starts); the
burst includes this client's create calls, which pass through the admission chain (webhook call
or CEL), so its difference is mostly admission cost.
"""


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
