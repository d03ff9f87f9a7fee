"""What one status-only change of a MeteredProduct costs the operator: base commit and this tree.

    .venv/bin/python -m bench.bench_echoes --base 405248b --rounds 2 --output /tmp/echoes.md

While pods flow, the gate, metering and the spec reporter write the product's status, and each
write comes back to the operator as a watch event (an "echo") that kopf hands to every product
handler. Here the operator watches one product and no pods; the benchmark writes ``--echoes``
status-only changes (a condition of its own, server-side apply under its own field manager, one
every ``--gap`` seconds), and reads the operator's CPU (utime + stime from ``/proc``) over them,
less its idle CPU measured just before over ``--idle-seconds`` (``/proc`` counts in 10 ms ticks:
the idle figure is coarse). Base and new run alternately
(ABAB...) on the same cluster, each with its own tree's CRD (bench/compare_entitlement.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from devtools.cluster import ClusterInfo
from kubernetes import client
from tests.e2e.conftest import PRODUCT_CODE, emulator_config, install_crd
from tests.emulator.harness import EmulatorProcess, start_emulator

from bench.bench_entitlement import Rss
from bench.compare_entitlement import Variant, base_variant, new_variant, operator_run
from bench.machine_facts import machine_facts
from bench.reporting import command_line, open_session
from metering_operator.domain.product import GROUP, PLURAL, VERSION


def echo(custom: client.CustomObjectsApi, namespace: str, i: int) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": "bench", "namespace": namespace},
        "status": {
            "conditions": [
                {
                    "type": "BenchEcho",
                    "status": "True",
                    "reason": "Echo",
                    "message": f"echo {i}",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ]
        },
    }
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        namespace,
        PLURAL,
        "bench",
        body,
        field_manager="bench-echo",
        force=True,
        _content_type="application/apply-patch+yaml",
        _preload_content=False,
    ).release_conn()


def one_run(
    variant: Variant,
    args: argparse.Namespace,
    api: client.ApiClient,
    info: ClusterInfo,
    emulator: EmulatorProcess,
    work: Path,
    tag: str,
) -> dict[str, Any]:
    custom = client.CustomObjectsApi(api)
    pem = emulator.admin.public_key_pem(PRODUCT_CODE, 1)
    out: dict[str, Any] = {"variant": variant.name, "tag": tag, "load_start": os.getloadavg()[0]}
    with operator_run(variant, api, info, emulator, pem, work / f"operator-{tag.lower()}.log") as (
        namespace,
        op,
    ):
        rss = Rss(op.pid)
        time.sleep(args.settle_seconds)  # the product's first status writes and their echoes
        cpu0 = rss.cpu_seconds()
        time.sleep(args.idle_seconds)
        idle_per_second = (rss.cpu_seconds() - cpu0) / args.idle_seconds
        cpu0, t0 = rss.cpu_seconds(), time.monotonic()
        for i in range(args.echoes):
            echo(custom, namespace, i)
            time.sleep(args.gap)
        time.sleep(args.settle_seconds)
        cpu, elapsed = rss.cpu_seconds() - cpu0, time.monotonic() - t0
        out.update(
            cpu_ms_per_echo=1000 * (cpu - idle_per_second * elapsed) / args.echoes,
            idle_ms_per_s=1000 * idle_per_second,
            load_end=os.getloadavg()[0],
        )
    print(f"   {tag} {variant.name}: {out}", flush=True)
    return out


def render(r: dict[str, Any]) -> str:
    names = list(dict.fromkeys(x["variant"] for x in r["runs"]))
    cells: dict[str, dict[str, str]] = {}
    medians: dict[str, dict[str, float]] = {}
    for name in names:
        runs = [x for x in r["runs"] if x["variant"] == name]
        cells[name], medians[name] = {}, {}
        for key in ("cpu_ms_per_echo", "idle_ms_per_s"):
            values = [float(x[key]) for x in runs]
            medians[name][key] = statistics.median(values)
            cells[name][key] = f"{medians[name][key]:.2f} ({' / '.join(f'{v:.2f}' for v in values)})"
    rows = [
        ("operator CPU per status-only echo (idle subtracted)", "ms", "cpu_ms_per_echo"),
        ("operator idle CPU (product watched, no pods)", "ms/s", "idle_ms_per_s"),
    ]
    table = [
        "| measure | unit | base: median (each run) | new: median (each run) | new / base |",
        "|---|---|---|---|---|",
    ]
    for label, unit, key in rows:
        ratio = medians["new"][key] / medians["base"][key] if medians["base"][key] else float("nan")
        table.append(f"| {label} | {unit} | {cells['base'][key]} | {cells['new'][key]} | {ratio:.2f} |")
    order = " ".join(x["tag"] for x in r["runs"])
    loads = ", ".join(f"{x['tag']} {x['load_start']:.1f}->{x['load_end']:.1f}" for x in r["runs"])
    return f"""# Status-only echoes of a MeteredProduct: base commit and new code side by side

- Command: `{r["command"]}`
- Machine: {r["machine"]}, Python {r["python"]}; `nproc` {r["nproc"]}; other work shares it.
- Variants: {"; ".join(r["variants"])}. One product, no pods; {r["echoes"]} status-only server-side
  applies of a foreign condition, one every {r["gap"]} s. Order (alternating): {order}.
- 1-minute load average at the start / end of each run: {loads}.

{chr(10).join(table)}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--echoes", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between two status writes")
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    variants = [base_variant(args.base), new_variant()]
    results: dict[str, Any] = {
        "command": command_line("python -m bench.bench_echoes", argv),
        **machine_facts(),
        "variants": [f"{v.name} `{v.commit}`" for v in variants],
        "echoes": args.echoes,
        "gap": args.gap,
        "runs": [],
    }
    cluster, info, api, work = open_session("bench-echoes-")
    emulator: EmulatorProcess | None = None
    try:
        install_crd(api)
        emulator = start_emulator(emulator_config(info), work / "emulator")
        for round_index in range(args.rounds):
            for variant in variants:
                tag = f"{'AB'[variants.index(variant)]}{round_index + 1}"
                print(f"== {tag}: {variant.name} {variant.commit}", flush=True)
                results["runs"].append(one_run(variant, args, api, info, emulator, work, tag))
    finally:
        if emulator is not None:
            emulator.stop()
        install_crd(api)  # leave this tree's CRD installed
        api.close()
        cluster.release(os.getpid(), keep=True)
    text = render(results)
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
