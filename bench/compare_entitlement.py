"""Side by side: the entitlement gate of a named base commit and of this tree, one run, one machine.

    .venv/bin/python -m bench entitlement --base 2a5c17a --rounds 2 --output bench/results/entitlement.md

The base commit is checked out once as a detached ``git worktree`` under ``.local/bench-base/`` and its
operator runs from that source root with this virtualenv's interpreter (``PYTHONPATH`` points at its
``operator/``), so both operators share the interpreter, the libraries, the cluster and the emulator.
The two run alternately, base then new, ``--rounds`` times (ABAB...), each in a fresh namespace with
the same product, so drift in the machine's load (other work shares its cores) hits both alike. Per
run: idle RSS, a steady stream (gate latency, CPU per pod), a burst created at once and a backlog
waiting before the operator starts (pods/s, CPU per pod, writes and AWS calls per pod), peak RSS.
CPU is the operator process's utime + stime from ``/proc/<pid>/stat`` over each phase.

``--profile DIR`` adds one more run of the new operator, left out of the comparison, sampled with py-spy
during its steady, burst and backlog phases: the folded stacks and a summary (top frames by own and total
samples, see bench/profile_summary.py) are written to DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devtools.cluster import ClusterInfo
from kubernetes import client
from tests.e2e.conftest import (
    BUYER_ROLE,
    CRD_FILE,
    PRODUCT_CODE,
    REPO_ROOT,
    OperatorProcess,
    emulator_config,
    install_crd,
    launch_operator,
    remove_products,
)
from tests.emulator.harness import EmulatorProcess, start_emulator

from bench import profile_summary
from bench.bench_entitlement import (
    BareBaseline,
    ReleaseWatch,
    Rss,
    aws_calls,
    create_pod,
    pct,
    phase_summary,
    pod_patches,
    wait_gated_by_policy,
    wait_released,
)
from bench.machine_facts import machine_facts
from bench.reporting import command_line, open_session, publish
from metering_operator.admission.install import delete as delete_policies
from metering_operator.domain.product import GROUP, PLURAL, VERSION


@dataclass(frozen=True)
class Variant:
    name: str  # "base", "new" or "new-policy"
    commit: str
    root: Path  # source root holding operator/
    #: What adds the gate to new pods: the operator's webhook (local mode), or the
    #: MutatingAdmissionPolicy the chart installs on Kubernetes >= 1.36 (no webhook to serve).
    gate: str = "webhook"


def git(*args: str, cwd: Path = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def base_variant(commit: str) -> Variant:
    """A detached worktree of ``commit`` (kept between runs: checking out is not what we measure)."""
    sha = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    root = REPO_ROOT / ".local" / "bench-base" / sha
    if not (root / "operator").is_dir():
        root.parent.mkdir(parents=True, exist_ok=True)
        git("worktree", "add", "--detach", "--force", str(root), sha)
    return Variant("base", sha, root)


def new_variant() -> Variant:
    sha = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "operator")
    return Variant("new", sha + ("+uncommitted" if dirty else ""), REPO_ROOT)


def policy_prefix(namespace: str) -> str:
    return f"bench-{namespace}"


def start_operator(
    variant: Variant, info: ClusterInfo, namespace: str, emulator: EmulatorProcess, log: Path
) -> OperatorProcess:
    env = {"PYTHONPATH": str(variant.root / "operator")}
    if variant.gate == "policy":
        # As the chart runs it on this server: its MutatingAdmissionPolicy adds the gate and its
        # ValidatingAdmissionPolicies check every pod write; the operator serves no webhook.
        prefix = ["--admission-policies", "--admission-policy-prefix", policy_prefix(namespace)]
        return launch_operator(
            info, namespace, emulator, log, extra_env=env, webhook=False, policies=True, extra_args=prefix
        )
    # 2a5c17a predates --no-admission-policies (it has no policies to turn off): ``policies=True``
    # only keeps the flag off its command line. A later base turns them off like this tree does.
    run_py = (variant.root / "operator" / "metering_operator" / "commands" / "run.py").read_text()
    has_policies = "--admission-policies" in run_py
    return launch_operator(info, namespace, emulator, log, extra_env=env, policies=not has_policies)


class Profiler:
    """py-spy sampling the operator process (non-idle samples only: where its CPU goes)."""

    #: ``--gil``: sample only the thread holding the GIL, i.e. where the Python CPU goes (threads
    #: waiting for the GIL after a syscall are otherwise counted in the frame that released it).
    gil = False

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        py_spy = Path(sys.executable).with_name("py-spy")
        gil = ["--gil"] if self.gil else []
        self.proc = subprocess.Popen(
            [
                str(py_spy),
                "record",
                "--pid",
                str(pid),
                "--rate",
                "200",
                *gil,
                "--format",
                "raw",
                "-o",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        self.proc.send_signal(2)  # SIGINT: py-spy writes its file and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def install_variant_crd(api: client.ApiClient, variant: Variant) -> None:
    """The MeteredProduct CRD of the variant's own tree: the base's models forbid fields a newer CRD
    defaults (e.g. ``entitlement.source``), so each side runs with the schema it was written for.
    No product exists between runs (each run's namespace is deleted), so swapping it loses nothing."""
    install_crd(api, variant.root / CRD_FILE.relative_to(REPO_ROOT))
    time.sleep(2)  # the API server swaps in the new schema's handler asynchronously


def new_namespace(core: client.CoreV1Api) -> str:
    namespace = str(core.create_namespace({"metadata": {"generateName": "bench-cmp-"}}).metadata.name)
    deadline = time.monotonic() + 60
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            break
        except client.ApiException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    core.create_namespaced_service_account(
        namespace,
        {"metadata": {"name": "buyer", "annotations": {"eks.amazonaws.com/role-arn": BUYER_ROLE}}},
    )
    return namespace


def create_product(api: client.ApiClient, namespace: str, pem: str) -> None:
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": "bench"},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "publicKey": {"pem": pem},
                "selector": {"matchLabels": {"app": "bench"}},
            },
        },
    )


def wait_namespace_gone(core: client.CoreV1Api, namespace: str, timeout: float = 120) -> None:
    core.delete_namespace(namespace, propagation_policy="Background")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            core.read_namespace(namespace)
        except client.ApiException as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.5)


@contextlib.contextmanager
def profiling(pid: int, out: Path | None) -> Iterator[None]:
    profiler = Profiler(pid, out) if out is not None else None
    try:
        yield
    finally:
        if profiler is not None:
            profiler.stop()


@contextlib.contextmanager
def operator_run(
    variant: Variant,
    api: client.ApiClient,
    info: ClusterInfo,
    emulator: EmulatorProcess,
    pem: str,
    log: Path,
) -> Iterator[tuple[str, OperatorProcess]]:
    """The variant's operator, ready, watching a fresh namespace with the bench product; removed after."""
    core = client.CoreV1Api(api)
    install_variant_crd(api, variant)
    namespace = new_namespace(core)
    create_product(api, namespace, pem)
    op = start_operator(variant, info, namespace, emulator, log)
    try:
        op.wait_ready()
        if variant.gate == "policy":
            wait_gated_by_policy(core, namespace)
        time.sleep(2)  # the product's controller starts right after readiness
        yield namespace, op
    finally:
        remove_products(api, [namespace], operator_alive=op.alive())
        op.stop()
        if op.webhook_configuration:
            with contextlib.suppress(client.ApiException):
                client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(
                    op.webhook_configuration
                )
        if variant.gate == "policy":
            delete_policies(api, policy_prefix(namespace))
        wait_namespace_gone(core, namespace)


def one_run(
    variant: Variant,
    args: argparse.Namespace,
    api: client.ApiClient,
    info: ClusterInfo,
    emulator: EmulatorProcess,
    pem: str,
    work: Path,
    tag: str,
    profile_dir: Path | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"variant": variant.name, "tag": tag, "load_start": os.getloadavg()[0]}
    with operator_run(variant, api, info, emulator, pem, work / f"operator-{tag.lower()}.log") as (
        namespace,
        op,
    ):
        return measured_run(args, api, emulator, namespace, op, out, profile_dir)


def measured_run(
    args: argparse.Namespace,
    api: client.ApiClient,
    emulator: EmulatorProcess,
    namespace: str,
    op: OperatorProcess,
    out: dict[str, Any],
    profile_dir: Path | None,
) -> dict[str, Any]:
    core = client.CoreV1Api(api)
    tag = out["tag"]
    rw: ReleaseWatch | None = None
    rss: Rss | None = None
    try:
        rss = Rss(op.pid)
        out["rss_idle_mb"] = rss.now() / 1024
        rw = ReleaseWatch(api, namespace, "app=bench")

        # (a) steady stream
        n_steady = int(args.steady_rate * args.steady_seconds)
        created: dict[str, float] = {}
        patches0, calls0, cpu0 = pod_patches(api), aws_calls(emulator), rss.cpu_seconds()
        start = time.monotonic()

        def create_steady(i: int) -> None:
            name = f"steady-{i:04d}"
            create_pod(core, namespace, name, "bench", "buyer")
            created[name] = time.monotonic()

        names = [f"steady-{i:04d}" for i in range(n_steady)]
        with (
            profiling(op.pid, profile_dir / "steady.folded" if profile_dir else None),
            ThreadPoolExecutor(8) as pool,
        ):
            for i in range(n_steady):
                delay = start + i / args.steady_rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(create_steady, i)
            pool.shutdown(wait=True)
            wait_released(rw, names, 300)
        latencies = [max(0.0, rw.released[n] - created[n]) for n in names]
        steady = phase_summary(
            "steady", n_steady, pod_patches(api) - patches0, calls0, aws_calls(emulator), 0
        )
        steady.update(
            cpu_ms_per_pod=1000 * (rss.cpu_seconds() - cpu0) / n_steady,
            p50=pct(latencies, 50),
            p99=pct(latencies, 99),
        )
        out["steady"] = steady
        print(f"  {tag} steady {steady}", flush=True)

        # (b) burst, created at once
        names = [f"burst-{i:04d}" for i in range(args.burst)]
        patches0, calls0, cpu0 = pod_patches(api), aws_calls(emulator), rss.cpu_seconds()
        with profiling(op.pid, profile_dir / "burst.folded" if profile_dir else None):
            t0 = time.monotonic()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda n: create_pod(core, namespace, n, "bench", "buyer"), names))
            t_created = time.monotonic()
            wait_released(rw, names, 300)
        t_done = max(rw.released[n] for n in names)
        burst = phase_summary(
            "burst", args.burst, pod_patches(api) - patches0, calls0, aws_calls(emulator), 0
        )
        burst.update(
            cpu_ms_per_pod=1000 * (rss.cpu_seconds() - cpu0) / args.burst,
            pods_per_second=args.burst / (t_done - t0),
            create_seconds=t_created - t0,
        )
        out["burst"] = burst
        print(f"  {tag} burst {burst}", flush=True)
        peak = rss.peak

        # (b2) backlog: gated pods waiting while the operator is down, then it starts
        op.stop()
        rss.stop()
        names = [f"backlog-{i:04d}" for i in range(args.burst)]
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: create_pod(core, namespace, n, "bench", "buyer", gated=True), names))
        patches0, calls0 = pod_patches(api), aws_calls(emulator)
        op.start()
        rss = Rss(op.pid)
        with profiling(op.pid, profile_dir / "backlog.folded" if profile_dir else None):
            op.wait_ready()
            wait_released(rw, names, 300)
        cpu_total = rss.cpu_seconds()  # since the process started: imports and startup included
        first = min(rw.released[n] for n in names)
        last = max(rw.released[n] for n in names)
        backlog = phase_summary(
            "backlog", args.burst, pod_patches(api) - patches0, calls0, aws_calls(emulator), 0
        )
        backlog.update(process_cpu_s=cpu_total, pods_per_second=args.burst / max(1e-9, last - first))
        out["backlog"] = backlog
        print(f"  {tag} backlog {backlog}", flush=True)
        out["rss_peak_mb"] = max(peak, rss.peak) / 1024
        out["load_end"] = os.getloadavg()[0]
        return out
    finally:
        if rw is not None:
            rw.stop()
        if rss is not None:
            rss.stop()


METRICS: tuple[tuple[str, str, str, bool], ...] = (
    # (label, path, unit, lower is better)
    ("operator CPU per gated pod, steady", "steady.cpu_ms_per_pod", "ms", True),
    ("operator CPU per gated pod, burst", "burst.cpu_ms_per_pod", "ms", True),
    ("burst throughput (created at once)", "burst.pods_per_second", "pods/s", False),
    ("backlog throughput (waiting, then operator starts)", "backlog.pods_per_second", "pods/s", False),
    ("backlog: process CPU from start to last release", "backlog.process_cpu_s", "s", True),
    ("steady gate latency p50", "steady.p50", "ms", True),
    ("steady gate latency p99", "steady.p99", "ms", True),
    ("RSS idle (product watched, no pods)", "rss_idle_mb", "MiB", True),
    ("RSS peak (steady + burst + backlog)", "rss_peak_mb", "MiB", True),
    ("pod writes per pod (max of phases)", "writes", "", True),
    ("RegisterUsage per pod (all phases)", "register", "", True),
)


def value(run: dict[str, Any], path: str) -> float:
    if path == "writes":
        return float(max(run[p]["writes_per_pod"] for p in ("steady", "burst", "backlog")))
    if path == "register":
        return float(max(run[p]["register_per_pod"] for p in ("steady", "burst", "backlog")))
    node: Any = run
    for part in path.split("."):
        node = node[part]
    scale = 1000.0 if path.endswith((".p50", ".p99")) else 1.0
    return float(node) * scale


def render(r: dict[str, Any]) -> str:
    runs: list[dict[str, Any]] = r["runs"]
    names = list(dict.fromkeys(x["variant"] for x in runs))
    by_name = {name: [x for x in runs if x["variant"] == name] for name in names}
    rows = []
    for label, path, unit, _lower in METRICS:
        medians = {}
        cells = []
        for name in names:
            values = [value(x, path) for x in by_name[name]]
            medians[name] = statistics.median(values)
            each = " / ".join(f"{v:.3g}" for v in values)
            cells.append(f"{medians[name]:.3g} ({each})")
        base = medians.get("base")
        others = [name for name in names if name != "base"] if base is not None else []
        ratios = "".join(f" | {medians[name] / base:.2f}" if base else " | -" for name in others)
        rows.append(f"| {label} | {unit} | {' | '.join(cells)}{ratios} |")
    ratio_names = [name for name in names if name != "base"] if "base" in names else []
    header = (
        "| measure | unit | "
        + " | ".join(f"{name}: median (each run)" for name in names)
        + "".join(f" | {name} / base" for name in ratio_names)
        + " |"
    )
    rule = "|---|---|" + "---|" * (len(names) + len(ratio_names))
    table = "\n".join(rows)
    order = " ".join(f"{x['tag']}" for x in runs)
    loads = ", ".join(f"{x['tag']} {x['load_start']:.1f}->{x['load_end']:.1f}" for x in runs)
    creates = ", ".join(f"{x['tag']} {x['burst']['create_seconds']:.1f} s" for x in runs)
    bare = r["bare"]
    variants = "; ".join(r["variants"])
    return f"""# Entitlement gate: base commit and new code side by side

- Command: `{r["command"]}`
- Machine: {r["machine"]}, Python {r["python"]}; `nproc` {r["nproc"]}. Cluster (kube-apiserver, etcd, KWOK),
  emulator, the operators and this client share it; other work on the machine shares it too.
- Variants: {variants}. One cluster, one emulator, one product spec; each side with its own tree's CRD.
- Order (alternating, to cancel drift): {order}. Each run has its own namespace, deleted before the next.
- 1-minute load average at the start / end of each run: {loads}; {r["load_start"]:.1f} when the
  benchmark started and {r["load_end"]:.1f} when it ended.
- Phases per run: a steady stream of {r["steady_pods"]} pods at {r["steady_rate"]:g}/s, a burst of
  {r["burst"]} pods created at once (16 client threads), a backlog of {r["burst"]} gated pods created while
  the operator is stopped. CPU: the operator process's utime + stime (/proc/<pid>/stat) over the phase,
  divided by its pods (admission, watch, registration and writes all included).
- Burst: time the 16 client threads took to create the pods (part of the burst's time): {creates}.

{header}
{rule}
{table}

Bare STS + RegisterUsage round trip through boto3 (no operator), after the runs:
p50 {bare["p50"] * 1000:.1f} ms, p99 {bare["p99"] * 1000:.1f} ms.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="commit to compare with (e.g. 2a5c17a)")
    parser.add_argument("--rounds", type=int, default=2, help="base/new pairs, run alternately")
    parser.add_argument("--steady-rate", type=float, default=10.0)
    parser.add_argument("--steady-seconds", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--baseline", type=int, default=30, help="pods for the bare boto3 round trip")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="one extra, unmeasured run of the new operator sampled by py-spy into this directory",
    )
    parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (py-spy --gil)",
    )
    parser.add_argument(
        "--policy-gate",
        action="store_true",
        help="a third variant: this tree with its MutatingAdmissionPolicy adding the gate (no webhook)",
    )
    parser.add_argument(
        "--only", choices=["base", "new", "new-policy"], default=None, help="run one variant only"
    )
    parser.add_argument(
        "--find-rate",
        action="store_true",
        help="instead of the fixed phases: find the highest steady rate the base sustains without queueing "
        "(bench/rate_search.py), then run base and new at it (--rounds, --steady-seconds)",
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[10.0, 15.0, 20.0, 30.0, 40.0, 50.0],
        help="with --find-rate: the steady rates tried, ascending (pods/s, comma-separated)",
    )
    parser.add_argument(
        "--search-seconds", type=float, default=15.0, help="with --find-rate: the stream of one step"
    )
    parser.add_argument(
        "--client-threads", type=int, default=16, help="with --find-rate: client threads creating pods"
    )
    parser.add_argument(
        "--max-p50-ms", type=float, default=500.0, help="with --find-rate: the rule's bound on a stream's p50"
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    command = command_line("python -m bench entitlement", argv)
    Profiler.gil = args.profile_gil
    variants = [base_variant(args.base), new_variant()]
    if args.policy_gate:
        variants.append(Variant("new-policy", variants[1].commit, variants[1].root, gate="policy"))
    results: dict[str, Any] = {
        "command": command,
        **machine_facts(),
        "load_start": os.getloadavg()[0],
        "variants": [f"{v.name} `{v.commit}` ({v.gate} adds the gate)" for v in variants],
        "steady_rate": args.steady_rate,
        "steady_pods": int(args.steady_rate * args.steady_seconds),
        "burst": args.burst,
        "runs": [],
    }
    cluster, info, api, work = open_session("bench-compare-", 32)
    emulator: EmulatorProcess | None = None
    try:
        install_crd(api)
        emulator = start_emulator(emulator_config(info), work / "emulator")
        pem = emulator.admin.public_key_pem(PRODUCT_CODE, 1)
        if args.find_rate:
            from bench import rate_search  # imports this module: loaded only when asked for

            results["search"] = rate_search.run(variants, args, api, info, emulator, pem, work)
        for round_index in range(0 if args.find_rate else args.rounds):
            for variant in variants:
                if args.only and variant.name != args.only:
                    continue
                tag = f"{'ABC'[variants.index(variant)]}{round_index + 1}"
                print(f"== {tag}: {variant.name} {variant.commit}", flush=True)
                results["runs"].append(one_run(variant, args, api, info, emulator, pem, work, tag, None))
        if args.profile is not None:
            # A run of its own, left out of the table: sampling slows the process it samples.
            args.profile.mkdir(parents=True, exist_ok=True)
            print(f"== P: new {variants[1].commit}, profiled into {args.profile}", flush=True)
            one_run(variants[1], args, api, info, emulator, pem, work, "p", args.profile)
            for phase in ("steady", "burst", "backlog"):
                folded = args.profile / f"{phase}.folded"
                if folded.exists():
                    (args.profile / f"{phase}.txt").write_text(profile_summary.summarize(folded))
        core = client.CoreV1Api(api)
        namespace = new_namespace(core)
        try:
            bare = BareBaseline(api, core, namespace, emulator, "cmp", args.baseline)
            for i in range(args.baseline):
                bare.one(i)
        finally:
            wait_namespace_gone(core, namespace)
        results["bare"] = {"p50": pct(bare.pairs, 50), "p99": pct(bare.pairs, 99)}
        results["load_end"] = os.getloadavg()[0]
    finally:
        install_crd(api)  # this tree's CRD again, for whatever runs next on the cluster
        if emulator is not None:
            emulator.stop()
        cluster.release(os.getpid(), keep=True)
    if args.find_rate:
        from bench import rate_search

        results.update(
            rates=args.rates,
            search_seconds=args.search_seconds,
            steady_seconds=args.steady_seconds,
            client_threads=args.client_threads,
        )
        report = rate_search.render(results)
    elif not results["runs"]:
        return 0  # --rounds 0: a profiling run only
    else:
        report = render(results)
    return publish(report, args.output)


if __name__ == "__main__":
    sys.exit(main())
