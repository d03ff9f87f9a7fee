"""Side by side: the gate's pure state machine of a named base commit and of this tree, one run.

    .venv/bin/python -m bench machine --base c4c11f7 --output bench/results/machine.md

No cluster, no AWS: bench/machine_driver.py feeds ``gate/machine.step`` a synthetic burst -- N
gated pods created at once, each registered (RegisterUsage, or a License Manager checkout for a
contract product) and its grant written, every call answered at once in the order asked for -- and
reports the CPU the steps took (``time.process_time``). Each variant runs in its own subprocess
whose ``PYTHONPATH`` is that tree's ``operator/`` (the base as a detached worktree under
``.local/bench-base/``, as bench/compare_entitlement.py does), alternately base then new,
``--rounds`` times; the table shows each variant's best round and the ratios.

Before timing, ``--check-seeds`` seeded random traces (pods created, deleted, ungated and
terminating; registrations granted, denied, throttled and failed; writes and evictions failing;
clock jumps and timers; spec changes, holds, relists; contract seats checked out, extended, checked
in and lapsing) run through both machines, which must produce the same effects, step by step, and
the same final pods: the SHA-256 of each trace is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.e2e.conftest import REPO_ROOT

from bench.compare_entitlement import Variant, base_variant, new_variant
from bench.machine_driver import SCOPES
from bench.machine_facts import machine_facts


def driver(variant: Variant, *args: str) -> list[dict[str, Any]]:
    env = {**os.environ, "PYTHONPATH": str(variant.root / "operator")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.machine_driver", *args],
        cwd=REPO_ROOT,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{variant.name}: machine_driver {' '.join(args)} failed:\n{done.stderr}")
    out = done.stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    expected = str(variant.root / "operator" / "metering_operator" / "gate" / "machine.py")
    for row in rows:
        if row["machine"] != expected:
            raise SystemExit(f"{variant.name}: ran {row['machine']}, not {expected}")
    return rows


def check(variants: list[Variant], scope: str, seeds: int, steps: int) -> dict[str, Any]:
    args = ("trace", "--seeds", str(seeds), "--steps", str(steps), "--scope", scope)
    base, new = (driver(v, *args) for v in variants)
    same = sum(1 for a, b in zip(base, new, strict=True) if a["sha256"] == b["sha256"])
    effects: dict[str, int] = {}
    for row in new:
        for kind, n in row["effects"].items():
            effects[kind] = effects.get(kind, 0) + n
    return {
        "scope": scope,
        "seeds": seeds,
        "steps": sum(r["steps"] for r in new),
        "same": same,
        "effects": effects,
    }


def render(r: dict[str, Any]) -> str:
    lines = [
        "# The gate's state machine: base vs this tree (bench/bench_machine.py)",
        "",
        f"- Command: `{r['command']}`",
        f"- Date (UTC): {r['date']}",
        f"- Machine: {r['machine']}, Python {r['python']}; `nproc` {r['nproc']}; 1-minute load "
        f"{r['load_start']:.2f} at the start, {r['load_end']:.2f} at the end (other work shares the cores).",
        f"- Base: `{r['base']}` (a git worktree); new: `{r['new']}`. Both run with this interpreter, "
        "one subprocess per variant and round, alternately.",
        f"- Burst: N gated pods at once, max_inflight {r['max_inflight']}; every call answered at once in "
        "the order asked for. CPU is `time.process_time` over the steps only (no imports, no I/O). "
        f"Best of {r['rounds']} rounds per variant.",
        "",
        "## Same behaviour",
        "",
        "| scope | traces | steps | identical (effects of every step, final pods) | effects in the traces |",
        "|---|---|---|---|---|",
    ]
    for c in r["checks"]:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(c["effects"].items()))
        lines.append(f"| {c['scope']} | {c['seeds']} | {c['steps']} | {c['same']}/{c['seeds']} | {kinds} |")
    lines += [
        "",
        "## Burst",
        "",
        "| scope | pods | steps | base CPU (s) | new CPU (s) | base steps per CPU s | new steps per CPU s "
        "| base CPU per pod (µs) | new CPU per pod (µs) | new/base CPU per pod |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["bursts"]:
        b, n = row["base"], row["new"]
        lines.append(
            f"| {row['scope']} | {row['pods']} | {n['steps']} | {b['cpu']:.3f} | {n['cpu']:.3f} "
            f"| {b['steps'] / b['cpu']:,.0f} | {n['steps'] / n['cpu']:,.0f} "
            f"| {b['cpu'] / row['pods'] * 1e6:,.0f} | {n['cpu'] / row['pods'] * 1e6:,.0f} "
            f"| {n['cpu'] / b['cpu']:.2f}x |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="c4c11f7", help="the commit to compare with")
    parser.add_argument("--pods", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--scopes", nargs="+", default=list(SCOPES), choices=SCOPES)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-inflight", type=int, default=16)
    parser.add_argument("--check-seeds", type=int, default=10)
    parser.add_argument("--check-steps", type=int, default=3000)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = "python -m bench machine " + " ".join(argv if argv is not None else sys.argv[2:])
    variants = [base_variant(args.base), new_variant()]
    results: dict[str, Any] = {
        "command": command.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        **machine_facts(),
        "load_start": os.getloadavg()[0],
        "base": variants[0].commit,
        "new": variants[1].commit,
        "rounds": args.rounds,
        "max_inflight": args.max_inflight,
        "checks": [],
        "bursts": [],
    }
    for scope in args.scopes:
        print(f"== check {scope}: {args.check_seeds} traces", flush=True)
        results["checks"].append(check(variants, scope, args.check_seeds, args.check_steps))
    best: dict[tuple[str, int, str], dict[str, Any]] = {}
    for round_index in range(args.rounds):
        for scope in args.scopes:
            for variant in variants:
                print(f"== round {round_index + 1} {scope}: {variant.name}", flush=True)
                burst = ("burst", "--scope", scope, "--max-inflight", str(args.max_inflight), "--pods")
                for row in driver(variant, *burst, *map(str, args.pods)):
                    key = (scope, row["pods"], variant.name)
                    if key not in best or row["cpu"] < best[key]["cpu"]:
                        best[key] = row
    for scope in args.scopes:
        for pods in args.pods:
            base, new = best[(scope, pods, "base")], best[(scope, pods, "new")]
            results["bursts"].append({"scope": scope, "pods": pods, "base": base, "new": new})
    results["load_end"] = os.getloadavg()[0]
    text = render(results)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    failed = [c for c in results["checks"] if c["same"] != c["seeds"]]
    if failed:
        print(f"behaviour differs from the base: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
