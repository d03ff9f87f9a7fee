"""Side by side: the operator CPU of each of the gate's five per-pod calls, a base commit vs this tree.

    .venv/bin/python -m bench calls --base 405248b --pods 220 --rounds 3 --output bench/results/calls.md

The five calls a gated pod costs -- TokenRequest, STS AssumeRoleWithWebIdentity, RegisterUsage, the
pod's JSON patch, the ``Registered`` Event -- made one pod at a time in one thread by
bench/calls_driver.py through each variant's own code (``Registrar``, ``PodApi``, ``EventPoster``,
the per-call signing Metering client), against the local cluster and the AWS emulator (unmodified
boto3 over HTTP, configured by ``AWS_ENDPOINT_URL*`` as the operator is). Each variant runs in its
own subprocess whose ``PYTHONPATH`` is that tree's ``operator/`` (the base as a detached worktree
under ``.local/bench-base/``, as bench/compare_entitlement.py does), alternately base then new,
``--rounds`` times, each on fresh pods; the table shows, per call, the median over rounds of each
round's mean thread CPU per call (ms), and new / base.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from devtools.cluster import LocalCluster
from devtools.stack import AWS_IDENTITY_VARIABLES
from kubernetes import client, config
from tests.e2e.conftest import PRODUCT_CODE, REPO_ROOT, TEST_REGION, emulator_config
from tests.emulator.harness import start_emulator

from bench.calls_driver import CALLS
from bench.compare_entitlement import Variant, base_variant, new_namespace, new_variant, wait_namespace_gone
from bench.machine_facts import machine_facts
from bench.reporting import command_line, publish
from metering_operator.domain.product import SCHEDULING_GATE
from metering_operator.kube.apiclient import release

#: A second scheduling gate beside the operator's, so patched pods are never scheduled.
HOLD_GATE = "calls.bench/hold"


def create_pods(core: client.CoreV1Api, namespace: str, label: str, n: int) -> None:
    def one(i: int) -> None:
        body = {
            "metadata": {"name": f"{label}-{i:04d}", "labels": {"app": label}},
            "spec": {
                "serviceAccountName": "buyer",
                "containers": [{"name": "a", "image": "registry.invalid/a:1"}],
                "schedulingGates": [{"name": SCHEDULING_GATE}, {"name": HOLD_GATE}],
            },
        }
        release(core.create_namespaced_pod(namespace, body, _preload_content=False))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(n)))


def drive(variant: Variant, env: dict[str, str], *args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.calls_driver", *args],
        cwd=REPO_ROOT,
        env={**env, "PYTHONPATH": f"{variant.root / 'operator'}{os.pathsep}{REPO_ROOT}"},
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{variant.name}: calls_driver failed:\n{done.stderr}")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    expected = str(variant.root / "operator" / "metering_operator" / "__init__.py")
    if row["source"] != expected:
        raise SystemExit(f"{variant.name}: ran {row['source']}, not {expected}")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    variants = [base_variant(args.base), new_variant()]
    cluster = LocalCluster()
    info, _ = cluster.acquire(os.getpid())
    work = Path(tempfile.mkdtemp(prefix="bench-calls-"))
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core = client.CoreV1Api(api)
    namespace = ""
    emulator = None
    try:
        namespace = new_namespace(core)
        emulator = start_emulator(emulator_config(info), work / "emulator")
        pem = work / "key.pem"
        pem.write_text(emulator.admin.public_key_pem(PRODUCT_CODE, 1))
        env = {k: v for k, v in os.environ.items() if k not in AWS_IDENTITY_VARIABLES}
        env.update(emulator.env(TEST_REGION))
        rows: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
        load_start = os.getloadavg()
        serial = 0
        for r in range(args.rounds):
            for variant in variants:
                serial += 1
                label = f"calls-{serial}"
                create_pods(core, namespace, label, args.pods)
                time.sleep(1)
                row = drive(
                    variant,
                    env,
                    "--kubeconfig",
                    str(info.kubeconfig),
                    "--namespace",
                    namespace,
                    "--label",
                    label,
                    "--region",
                    TEST_REGION,
                    "--product-code",
                    PRODUCT_CODE,
                    "--public-key",
                    str(pem),
                    "--warmup",
                    str(args.warmup),
                    *(["--profile", str(args.profile)] if args.profile and variant.name == "new" else []),
                )
                rows[variant.name].append(row)
                total = sum(row["cpu_mean"].values())
                print(f"round {r + 1} {variant.name}: {total:.2f} ms/pod {row['cpu_mean']}", flush=True)
        return {
            **machine_facts(),
            "variants": {v.name: v.commit for v in variants},
            "rows": rows,
            "load": (load_start, os.getloadavg()),
            "pods": args.pods - args.warmup,
        }
    finally:
        if emulator is not None:
            emulator.stop()
        if namespace:
            wait_namespace_gone(core, namespace)
        cluster.release(os.getpid(), keep=True)


def median_of(rows: list[dict[str, Any]], field: str, call: str) -> float:
    return float(statistics.median(row[field][call] for row in rows))


def render(r: dict[str, Any], command: str) -> str:
    base, new = r["rows"]["base"], r["rows"]["new"]
    lines = [
        "# The gate's five per-pod calls: operator CPU per call, base vs new",
        "",
        f"Machine: {r['machine']} (nproc {r['nproc']}), Python {r['python']}; load average "
        f"{r['load'][0][0]:.2f} at the start, {r['load'][1][0]:.2f} at the end.",
        f"Command: `{command}`",
        f"Base {r['variants']['base']}, new {r['variants']['new']}; {len(base)} rounds each, alternately, "
        f"{r['pods']} timed pods per round, one thread (bench/calls_driver.py).",
        "",
        "| call | base CPU ms | new CPU ms | new / base | base wall p50 ms | new wall p50 ms |",
        "|---|---|---|---|---|---|",
    ]
    totals = [0.0, 0.0]
    for call in CALLS:
        b, n = median_of(base, "cpu_mean", call), median_of(new, "cpu_mean", call)
        totals[0] += b
        totals[1] += n
        lines.append(
            f"| {call} | {b:.3f} | {n:.3f} | {n / b:.2f} | "
            f"{median_of(base, 'wall_median', call):.2f} | {median_of(new, 'wall_median', call):.2f} |"
        )
    lines.append(f"| all five | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] / totals[0]:.2f} | | |")
    retries = {name: sum(row["retries"] for row in rows) for name, rows in r["rows"].items()}
    lines += [
        "",
        "CPU: the median over rounds of each round's mean thread CPU per call (``time.thread_time``,",
        "the driver's own thread: the API server and the emulator are not in it). AWS calls repeated "
        f"after a retryable error (not timed apart): {retries}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the base commit (checked out as a worktree)")
    parser.add_argument("--pods", type=int, default=220)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the new variant's timed pods")
    args = parser.parse_args(argv)
    if args.pods <= args.warmup:
        parser.error("--pods must be more than --warmup")
    results = run(args)
    command = command_line(".venv/bin/python -m bench calls", argv)
    report = render(results, command)
    return publish(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
