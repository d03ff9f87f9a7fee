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
from bench.reporting import command_line, publish


def admission_cost(rounds: int = 4, calls: int = 100) -> dict[str, list[float]]:
    """Median milliseconds of one pod create and one pod update (dry runs, as the admin), with the
    policies bound to the namespace and without, alternating rounds so load drift hits both alike.

    Isolates what the CEL costs the API server per write from everything else the two full runs
    differ in (the operator's identity, the webhook, the machine's load over minutes).
    """
    import statistics
    import time

    from devtools.cluster import LocalCluster
    from kubernetes import client, config
    from tests.e2e.conftest import PRODUCT_CODE, install_crd

    from metering_operator.admission import install
    from metering_operator.admission.objects import Install
    from metering_operator.domain.product import GROUP, PLURAL, VERSION

    cluster = LocalCluster()
    info, _ = cluster.acquire(os.getpid())
    api = config.new_client_from_config(config_file=str(info.kubeconfig))
    core = client.CoreV1Api(api)
    ns = core.create_namespace({"metadata": {"generateName": "bench-admission-"}}).metadata.name
    prefix = f"bench-{ns}"
    result: dict[str, list[float]] = {
        "create without": [],
        "create with": [],
        "update without": [],
        "update with": [],
    }
    try:
        install_crd(api)
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP,
            VERSION,
            ns,
            PLURAL,
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "MeteredProduct",
                "metadata": {"name": "bench"},
                "spec": {
                    "productCode": PRODUCT_CODE,
                    "publicKeyVersion": 1,
                    "publicKey": {"configMapKeyRef": {"name": "k", "key": "k"}},
                    "selector": {"matchLabels": {"app": "bench"}},
                },
            },
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                core.read_namespaced_service_account("default", ns)
                break
            except client.ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        body: dict[str, Any] = {
            "metadata": {"name": "p", "labels": {"app": "bench"}},
            "spec": {
                "schedulingGates": [{"name": "marketplace.metering.dev/entitlement"}],
                "containers": [{"name": "a", "image": "registry.invalid/a:1"}],
            },
        }
        core.create_namespaced_pod(ns, body)

        def timed(call: Any) -> float:
            samples = []
            for i in range(calls):
                t0 = time.perf_counter()
                call(i)
                samples.append(1000 * (time.perf_counter() - t0))
            return statistics.median(samples)

        def create(i: int) -> None:
            core.create_namespaced_pod(
                ns, {**body, "metadata": {**body["metadata"], "name": f"c{i}"}}, dry_run="All"
            )

        def update(i: int) -> None:
            core.patch_namespaced_pod("p", ns, {"metadata": {"labels": {"n": str(i)}}}, dry_run="All")

        for _ in range(rounds):
            for label in ("without", "with"):
                if label == "with":
                    install.apply(api, Install(prefix, "system:serviceaccount:x:bench", namespaces=(ns,)))
                    time.sleep(3)  # policies load asynchronously
                result[f"create {label}"].append(timed(create))
                result[f"update {label}"].append(timed(update))
                if label == "with":
                    install.delete(api, prefix)
                    time.sleep(3)
        return result
    finally:
        install.delete(api, prefix)
        core.delete_namespace(ns, propagation_policy="Background")
        cluster.release(os.getpid(), keep=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--steady-rate", type=float, default=20.0)
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=30)
    parser.add_argument("--unrelated", type=int, default=200)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    print("===== admission cost per write, alternating", flush=True)
    cost = admission_cost()
    print(cost, flush=True)
    runs: dict[str, dict[str, Any]] = {}
    # Three runs: today's path (admin, webhook), the same as a ServiceAccount (what the identity
    # alone changes), and the chart's path on 1.36+ (ServiceAccount, policies, no webhook).
    configurations = (
        ("without", {"policies": False, "as_service_account": False}),
        ("sa", {"policies": False, "as_service_account": True}),
        ("with", {"policies": True, "as_service_account": True}),
    )
    for label, flags in configurations:
        print(f"===== {label}", flush=True)
        runs[label] = bench_entitlement.run(argparse.Namespace(**{**vars(args), **flags}))
    command = command_line("python -m bench.bench_policies", argv)
    report = render(runs, command, cost)
    return publish(report, args.output)


def _row(name: str, without: float, with_: float, unit: str, fmt: str = "{:.0f}") -> str:
    ratio = with_ / without if without else float("nan")
    return f"| {name} | {fmt.format(without)} {unit} | {fmt.format(with_)} {unit} | {ratio:.2f}x |"


def render(runs: dict[str, dict[str, Any]], command: str, cost: dict[str, list[float]]) -> str:
    a, b = runs["without"], runs["with"]
    ms = 1000.0
    c = runs["sa"]

    def row(name: str, key: tuple[str, str], unit: str, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
        x, y, z = (r[key[0]][key[1]] * scale for r in (a, c, b))
        return (
            f"| {name} | {fmt.format(x)} {unit} | {fmt.format(y)} {unit} | {fmt.format(z)} {unit} | "
            f"{z / y:.2f}x | {z / x:.2f}x |"
        )

    rows = [
        row("steady gate latency p50", ("steady", "p50"), "ms", ms),
        row("steady gate latency p95", ("steady", "p95"), "ms", ms),
        row("steady gate latency p99", ("steady", "p99"), "ms", ms),
        row("burst pods/s", ("burst", "pods_per_second"), "", fmt="{:.1f}"),
        row("backlog pods/s", ("backlog", "pods_per_second"), "", fmt="{:.1f}"),
        row("burst: create calls took", ("burst", "create_seconds"), "s", fmt="{:.1f}"),
        row("operator CPU per pod (steady)", ("steady", "cpu_ms_per_pod"), "ms"),
    ]
    exact = [
        row(f"{phase}: {what}", (phase, key), "", fmt="{:.2f}")
        for phase in ("steady", "burst", "backlog")
        for what, key in (
            ("pod writes per pod", "writes_per_pod"),
            ("RegisterUsage per pod", "register_per_pod"),
        )
    ]
    return f"""# Entitlement gate: with the admission policies next to without

- Machine: {a["machine"]}, Python {a["python"]}. The runs one after the other in one process
  (A, B, C), on the same local cluster, emulator and machine: `{command}`.
- A, without: the operator's webhook (local mode) adds the gate; no admission policies; the operator
  runs with the admin kubeconfig (today's path). B, as a ServiceAccount: the same, but the operator
  authenticates as a ServiceAccount (bound to cluster-admin): API Priority and Fairness exempts only
  the admin's `system:masters` group, so this is what the identity alone changes.
- C, with: as the chart installs it on Kubernetes >= 1.36: the operator runs as a ServiceAccount, its
  MutatingAdmissionPolicy adds the gate (no webhook), and the ValidatingAdmissionPolicies check every
  pod and workload write (`pod-records`, `product-pods` per MeteredProduct, `workload-records`,
  `cronjob-records`, and `operator` on the operator's own writes).
- Load: the machine is shared by five engineers' clusters and tests (2 cores). 1-minute load average
  A: {a["load_start"]:.1f} -> {a["load_end"]:.1f}; B: {c["load_start"]:.1f} -> {c["load_end"]:.1f};
  C: {b["load_start"]:.1f} -> {b["load_end"]:.1f}.
  Above ~2 every component waits for CPU; compare the columns, not the absolute numbers.

| measure | A: admin, webhook | B: ServiceAccount, webhook | C: ServiceAccount, policies | C / B | C / A |
|---|---|---|---|---|---|
{chr(10).join(rows)}

C / B is what the policies cost; C / A adds the operator's identity (API Priority and Fairness).

Exactness (each must be 1 RegisterUsage per pod, and the same writes):

| measure | A | B | C | C / B | C / A |
|---|---|---|---|---|---|
{chr(10).join(exact)}

## What the policies cost the API server per write

Median milliseconds of one dry-run pod create (through the MutatingAdmissionPolicy and the
validating ones) and one dry-run pod update, 100 calls each, in {len(cost["create with"])} rounds alternating
without / with the policies bound to the namespace (one MeteredProduct as param), so the
machine's load drifts over both alike:

| round | create without | create with | update without | update with |
|---|---|---|---|---|
{
        chr(10).join(
            f"| {i + 1} | {cost['create without'][i]:.1f} | {cost['create with'][i]:.1f} | "
            f"{cost['update without'][i]:.1f} | {cost['update with'][i]:.1f} |"
            for i in range(len(cost["create with"]))
        )
    }

## Notes

Steady: {a["steady"]["pods"]} pods; burst and backlog: {a["burst"]["pods"]} pods each.
The backlog rate is the operator's own throughput (pods already gated before it starts); the
burst includes this client's create calls, which pass through the admission chain (webhook call
or CEL), so its difference is mostly admission cost.
"""


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
