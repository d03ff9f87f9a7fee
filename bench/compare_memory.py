"""Side by side: the operator's memory and threads, a named base commit and this tree, one run.

    .venv/bin/python -m bench memory --base 2a5c17a --rounds 1 --output bench/results/memory.md

Same machinery as bench/compare_entitlement.py (the base commit as a detached worktree under
``.local/bench-base/``, run with this interpreter; base and new alternate, A1 B1 A2 B2 ...). The
pods are created once, before any operator runs, directly on the KWOK fake nodes (``nodeName`` set:
no scheduler, no kubelet; KWOK marks them Running), in ``--namespaces`` namespaces:

* ``--unselected`` pods (default 10,000) labelled ``app=filler`` that no product selects;
* ``--pods`` pods (default 2,000) of ``--products`` products (default 50), ``app=product-<p>``,
  with CPU and memory requests.

Per run, three operator processes:

1. **idle** -- watching one empty namespace holding one MeteredProduct (Enforce, no pods);
2. **configured** -- watching ``--namespaces`` empty namespaces, each with one metered product that
   selects nothing: the same operator configuration as the next one's first phase, without pods;
3. **loaded** -- watching the pod namespaces: first with one product per namespace that selects
   nothing there (``app=nobody``; metered, so valid with entitlement Off), so every namespace is
   watched while all of its pods are
   unselected ("unselected"); then with the ``--products`` products added, each metering 4
   dimensions (entitlement Off), once every one of them has sampled ("products").

Each figure is the process's VmRSS after it settled (the largest of 5 readings over 5 s, taken
``--settle`` seconds after the phase's condition held) and its thread count (``/proc/<pid>/task``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
    create_product,
    install_variant_crd,
    new_variant,
    wait_namespace_gone,
)
from bench.machine_facts import machine_facts
from bench.reporting import command_line, open_session, publish
from metering_operator.domain.product import GROUP, PLURAL, VERSION

H0 = datetime(2031, 5, 6, 7, tzinfo=UTC)
DIMENSIONS = [
    {"name": "replicas", "source": "Replicas", "aggregation": "Average", "rounding": "Up"},
    {"name": "ready-pods", "source": "ReadyPods", "aggregation": "Maximum", "rounding": "Up"},
    {"name": "vcpu", "source": "CPURequests", "aggregation": "Average", "rounding": "Decimal"},
    {"name": "memory-gib", "source": "MemoryRequestsGiB", "aggregation": "Average", "rounding": "Decimal"},
]
KEY = ("AKIABENCHMEMORY00001", "bench")


def code(product: int) -> str:
    return f"benchmemory{product:014d}"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def settled(pid: int, settle: float) -> tuple[float, int]:
    time.sleep(settle)
    readings = []
    for _ in range(5):
        readings.append(rss_mib(pid))
        time.sleep(1)
    return max(readings), threads(pid)


def wait(what: str, probe: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while not probe():
        if time.monotonic() - start > timeout:
            raise TimeoutError(what)
        time.sleep(1)
    took = time.monotonic() - start
    print(f"    {what}: {took:.0f} s", flush=True)
    return took


def create_pods(
    api: client.ApiClient, namespaces: list[str], nodes: list[str], args: argparse.Namespace
) -> None:
    core = client.CoreV1Api(api)
    jobs: list[tuple[str, str, dict[str, str], bool]] = []
    for i in range(args.unselected):
        jobs.append((namespaces[i % len(namespaces)], f"filler-{i:05d}", {"app": "filler"}, False))
    for i in range(args.pods):
        p = i % args.products
        labels = {"app": f"product-{p}", "team": ("red", "green", "blue", "gold")[p % 4]}
        jobs.append((namespaces[p % len(namespaces)], f"product-{p}-{i:05d}", labels, True))

    def one(n: int) -> None:
        namespace, name, labels, requests = jobs[n]
        container: dict[str, Any] = {"name": "a", "image": "registry.invalid/a:1"}
        if requests:
            container["resources"] = {"requests": {"cpu": "10m", "memory": "16Mi"}}
        body = {
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": nodes[n % len(nodes)], "containers": [container]},
        }
        try:
            response = core.create_namespaced_pod(namespace, body, _preload_content=False)
            response.read()  # to the end: the connection goes back to the pool reusable
            response.release_conn()
        except client.ApiException as exc:
            if exc.status != 409:  # kept from an earlier run: reused
                raise

    def running() -> bool:
        total = 0
        for ns in namespaces:
            token = None
            while True:
                page = core.list_namespaced_pod(
                    ns, limit=2000, _continue=token, field_selector="status.phase=Running"
                )
                total += len(page.items)
                token = page.metadata._continue
                if not token:
                    break
        return total >= len(jobs)

    if running():
        print(f"  {len(jobs)} pods kept from an earlier run (--keep-pods)", flush=True)
        return
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(len(jobs))))
    print(f"  {len(jobs)} pods created in {time.monotonic() - start:.0f} s", flush=True)
    wait(f"{len(jobs)} pods Running on the fake nodes", running, 1800)


def product_body(name: str, product_code: str, app: str, metering: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "productCode": product_code,
        "publicKeyVersion": 1,
        "selector": {"matchLabels": {"app": app}},
        "entitlement": {"mode": "Off"},
    }
    if metering:
        spec["metering"] = {"dimensions": DIMENSIONS}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": name},
        "spec": spec,
    }


def remove_all_products(custom: client.CustomObjectsApi, namespaces: list[str]) -> None:
    for ns in namespaces:
        for item in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
            name = item["metadata"]["name"]
            with contextlib.suppress(client.ApiException):
                custom.patch_namespaced_custom_object(
                    GROUP, VERSION, ns, PLURAL, name, {"metadata": {"finalizers": None}}
                )
            with contextlib.suppress(client.ApiException):
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def launch(
    variant: Variant,
    info: ClusterInfo,
    namespaces: list[str],
    emulator: EmulatorProcess,
    log: Path,
    extra_args: list[str] | None = None,
) -> OperatorProcess:
    env = {
        "PYTHONPATH": str(variant.root / "operator"),
        "AWS_ACCESS_KEY_ID": KEY[0],
        "AWS_SECRET_ACCESS_KEY": KEY[1],
    }
    op = launch_operator(
        info,
        namespaces,
        emulator,
        log,
        extra_env=env,
        policies=variant.name == "base",
        extra_args=extra_args or [],
    )
    op.wait_ready(120)
    return op


def statused(custom: client.CustomObjectsApi, names: list[tuple[str, str]]) -> Callable[[], bool]:
    def probe() -> bool:
        for ns, name in names:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            if not (obj.get("status") or {}).get("conditions"):
                return False
        return True

    return probe


def one_run(
    variant: Variant,
    args: argparse.Namespace,
    api: client.ApiClient,
    info: ClusterInfo,
    emulator: EmulatorProcess,
    pem: str,
    namespaces: list[str],
    work: Path,
    tag: str,
) -> dict[str, Any]:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    out: dict[str, Any] = {"variant": variant.name, "tag": tag, "load_start": os.getloadavg()[0]}
    # Each variant's own CRD: the API server's defaulting must give each operator the spec its
    # models accept (the base commit refuses fields added since, e.g. spec.entitlement.source).
    install_variant_crd(api, variant)

    # (1) idle: one product, no pods
    idle_ns = str(core.create_namespace({"metadata": {"generateName": "bench-mem-idle-"}}).metadata.name)
    create_product(api, idle_ns, pem)
    op = launch(variant, info, [idle_ns], emulator, work / f"operator-{tag.lower()}-idle.log")
    try:
        out["idle"] = settled(op.pid, args.settle)
    finally:
        op.stop()
        remove_all_products(custom, [idle_ns])
        wait_namespace_gone(core, idle_ns)
    print(f"  {tag} idle {out['idle']}", flush=True)

    metering_args = [
        "--sample-interval-seconds",
        str(args.interval),
        "--emulator-clock-url",
        emulator.url,
        "--lease-duration-seconds",
        "5",
    ]

    # (2) configured: the same products selecting nothing, in as many empty namespaces (no pods)
    empty = [
        str(core.create_namespace({"metadata": {"generateName": "bench-mem-empty-"}}).metadata.name)
        for _ in namespaces
    ]

    def with_nobody_products(watched: list[str], phase: str) -> OperatorProcess:
        """A product selecting nothing in each of ``watched``, and an operator watching them that
        has written each one's status."""
        for ns in watched:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, ns, PLURAL, product_body("nobody", code(900), "nobody", metering=True)
            )
        op = launch(
            variant,
            info,
            watched,
            emulator,
            work / f"operator-{tag.lower()}-{phase}.log",
            [*metering_args, "--operator-namespace", watched[0]],
        )
        try:
            wait(
                f"the nobody products' status written ({phase})",
                statused(custom, [(ns, "nobody") for ns in watched]),
                300,
            )
        except BaseException:
            op.stop()
            raise
        return op

    op = with_nobody_products(empty, "configured")
    try:
        out["configured"] = settled(op.pid, args.settle)
    finally:
        op.stop()
        remove_all_products(custom, empty)
        for ns in empty:
            wait_namespace_gone(core, ns)
    print(f"  {tag} configured {out['configured']}", flush=True)

    # (3) loaded: every pod unselected, then the products
    op = with_nobody_products(namespaces, "loaded")
    try:
        out["unselected"] = settled(op.pid, args.settle)
        print(f"  {tag} unselected {out['unselected']}", flush=True)
        for p in range(args.products):
            custom.create_namespaced_custom_object(
                GROUP,
                VERSION,
                namespaces[p % len(namespaces)],
                PLURAL,
                product_body(f"product-{p}", code(p), f"product-{p}", metering=True),
            )

        def all_sampling() -> bool:
            ok = 0
            for ns in namespaces:
                for item in custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
                    if not item["metadata"]["name"].startswith("product-"):
                        continue
                    open_hour = ((item.get("status") or {}).get("metering") or {}).get("openHour") or {}
                    dims = open_hour.get("dimensions") or []
                    ok += len(dims) == len(DIMENSIONS) and all(d.get("samples") for d in dims)
            return bool(ok == args.products)

        out["sync_s"] = wait(f"all {args.products} products sampling", all_sampling, 900)
        out["products"] = settled(op.pid, args.settle)
        print(f"  {tag} products {out['products']}", flush=True)
    finally:
        op.stop()
        remove_all_products(custom, namespaces)
    out["load_end"] = os.getloadavg()[0]
    return out


def render(r: dict[str, Any]) -> str:
    def med(variant: str, phase: str, i: int) -> float:
        return float(statistics.median(run[phase][i] for run in r["runs"] if run["variant"] == variant))

    def each(variant: str, phase: str, i: int) -> str:
        return " / ".join(f"{run[phase][i]:.0f}" for run in r["runs"] if run["variant"] == variant)

    def derived(variant: str, fn: Callable[[dict[str, Any]], float]) -> tuple[float, str]:
        values = [fn(run) for run in r["runs"] if run["variant"] == variant]
        return statistics.median(values), " / ".join(f"{v:.1f}" for v in values)

    loads = ", ".join(f"{run['tag']} {run['load_start']:.1f}->{run['load_end']:.1f}" for run in r["runs"])
    lines = [
        "## Operator memory and threads: base commit and this tree side by side",
        "",
        f"- Command: `{r['command']}`",
        f"- Machine: {r['machine']}, Python {r['python']}; `nproc` {r['nproc']}. Cluster (kube-apiserver,",
        "  etcd, KWOK), emulator, the operators and this client share it; other work on the machine too.",
        f"- Base: `{r['base']}` (a git worktree, run from its source root with this interpreter);",
        f"  new: `{r['new']}`.",
        f"- Load: {r['unselected']:,} pods no product selects (`app=filler`) and {r['pods']:,} pods of "
        f"{r['products']} products, over {r['namespaces']} namespaces, created before the operators ran, on "
        "KWOK fake nodes (small pods: one container, no volumes). Products: entitlement Off, 4 metering "
        f"dimensions, sampling every {r['interval']} s.",
        f"- Order (alternating): {' '.join(run['tag'] for run in r['runs'])}. 1-minute load average at "
        f"the start -> end of each run: {loads}.",
        "- idle: one MeteredProduct (Enforce, no pods) in an empty watched namespace. unselected: the pod "
        "namespaces watched, one product per namespace selecting nothing (every pod unselected). products: "
        f"the {r['products']} products added, all sampling. RSS: VmRSS, the largest of 5 readings after "
        f"{r['settle']:.0f} s settling.",
        "",
        "| measure | unit | base: median (each run) | new: median (each run) | new / base |",
        "|---|---|---|---|---|",
    ]
    for phase, label in (
        ("idle", "idle"),
        ("configured", f"{r['namespaces']} products selecting nothing, no pods"),
        ("unselected", f"{r['unselected'] + r['pods']:,} unselected pods"),
        ("products", f"{r['products']} products / {r['pods']:,} pods"),
    ):
        for i, (measure, unit) in enumerate((("RSS", "MiB"), ("threads", ""))):
            b, n = med("base", phase, i), med("new", phase, i)
            lines.append(
                f"| {measure}, {label} | {unit} | {b:.0f} ({each('base', phase, i)}) | "
                f"{n:.0f} ({each('new', phase, i)}) | {n / b:.2f} |"
            )
    for name, fn in (
        ("RSS growth idle -> products", lambda run: run["products"][0] - run["idle"][0]),
        ("RSS growth, same products, pods added", lambda run: run["unselected"][0] - run["configured"][0]),
        ("time until all products sample", lambda run: run["sync_s"]),
    ):
        (b, be), (n, ne) = derived("base", fn), derived("new", fn)
        unit = "s" if name.startswith("time") else "MiB"
        ratio = f"{n / b:.2f}" if b > 0 else "-"
        lines.append(f"| {name} | {unit} | {b:.1f} ({be}) | {n:.1f} ({ne}) | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="commit to compare with (e.g. 2a5c17a)")
    parser.add_argument("--rounds", type=int, default=1, help="base/new pairs, run alternately")
    parser.add_argument("--products", type=int, default=50)
    parser.add_argument("--pods", type=int, default=2000)
    parser.add_argument("--unselected", type=int, default=10000)
    parser.add_argument("--namespaces", type=int, default=5)
    parser.add_argument("--interval", type=int, default=10, help="metering sample interval (s)")
    parser.add_argument("--settle", type=float, default=15.0)
    parser.add_argument("--keep-pods", action="store_true", help="leave the pod namespaces for a next run")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = command_line("python -m bench memory", argv)
    variants = [base_variant(args.base), new_variant()]
    results: dict[str, Any] = {
        "command": command,
        **machine_facts(),
        "base": variants[0].commit,
        "new": variants[1].commit,
        **{
            k: getattr(args, k)
            for k in ("products", "pods", "unselected", "namespaces", "interval", "settle")
        },
        "runs": [],
    }
    cluster, info, api, work = open_session("bench-memory-", 32)
    core = client.CoreV1Api(api)
    namespaces = [f"bench-mem-{i}" for i in range(args.namespaces)]
    emulator: EmulatorProcess | None = None
    try:
        install_crd(api)

        def none_terminating() -> bool:
            phases = {n.metadata.name: n.status.phase for n in core.list_namespace().items}
            return all(phases.get(ns) != "Terminating" for ns in namespaces)

        wait("an earlier run's namespaces deleted", none_terminating, 900)
        for ns in namespaces:
            with contextlib.suppress(client.ApiException):
                core.create_namespace({"metadata": {"name": ns}})
        remove_all_products(client.CustomObjectsApi(api), namespaces)
        nodes = [n.metadata.name for n in core.list_node().items]
        create_pods(api, namespaces, nodes, args)
        products = [
            {
                "productCode": code(p),
                "dimensions": [{"name": d["name"]} for d in DIMENSIONS],
                "entitledAccounts": [BUYER_ACCOUNT],
            }
            for p in range(args.products)
        ]
        base_config = emulator_config(info)
        emulator = start_emulator(
            emulator_config(
                info,
                products=[*base_config["products"], *products],
                staticCredentials=[
                    {
                        "accessKeyId": KEY[0],
                        "secretAccessKey": KEY[1],
                        "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/bench",
                    }
                ],
            ),
            work / "emulator",
        )
        emulator.admin.set_clock(H0)
        pem = emulator.admin.public_key_pem(base_config["products"][0]["productCode"], 1)
        for round_index in range(args.rounds):
            for variant in variants:
                tag = f"{'AB'[variants.index(variant)]}{round_index + 1}"
                print(f"== {tag}: {variant.name} {variant.commit}", flush=True)
                results["runs"].append(
                    one_run(variant, args, api, info, emulator, pem, namespaces, work, tag)
                )
    finally:
        if emulator is not None:
            emulator.stop()
        if not args.keep_pods:
            for ns in namespaces:
                with contextlib.suppress(client.ApiException):
                    core.delete_namespace(ns)
        cluster.release(os.getpid(), keep=True)
    report = render(results)
    return publish(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
