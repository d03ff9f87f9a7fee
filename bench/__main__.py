"""`python -m bench` (`make bench`): run every benchmark and rewrite its results file.

Each benchmark also runs on its own (see bench/README.md); this only saves typing the four
commands. Benchmarks start or join the local cluster themselves.

`python -m bench entitlement --base <commit> ...` runs the side-by-side comparison of the gate
(bench/compare_entitlement.py): a base commit's operator and this tree's, alternately;
`python -m bench memory --base <commit>` the same for memory and threads (bench/compare_memory.py);
`python -m bench idle --base <commit>` threads and idle CPU with 50 products (bench/compare_idle.py).
`python -m bench ceiling` what the machine allows per gated pod without any operator
(bench/bench_ceiling.py: creation and per-pod call pipeline ceilings, CPU split per process).
`python -m bench calls --base <commit>` the operator CPU of each of the gate's five per-pod calls,
base vs this tree (bench/bench_calls.py).
`python -m bench machine --base <commit>` the gate's pure state machine alone, base vs this tree
(bench/bench_machine.py: no cluster, synthetic bursts, and the same-behaviour check).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS: tuple[tuple[str, ...], ...] = (
    ("bench.bench_emulator", "--output", "bench/results/emulator.md"),
    ("bench.bench_entitlement", "--output", "bench/results/entitlement.md"),
    ("bench.bench_policies", "--output", "bench/results/policies.md"),
    ("bench.bench_metering", "--cluster", "--output", "bench/results/metering.md"),
)


def main() -> int:
    if sys.argv[1:2] == ["entitlement"]:
        from bench import compare_entitlement

        return compare_entitlement.main(sys.argv[2:])
    if sys.argv[1:2] == ["ceiling"]:
        from bench import bench_ceiling

        return bench_ceiling.main(sys.argv[2:])
    if sys.argv[1:2] == ["idle"]:
        from bench import compare_idle

        return compare_idle.main(sys.argv[2:])
    if sys.argv[1:2] == ["calls"]:
        from bench import bench_calls

        return bench_calls.main(sys.argv[2:])
    if sys.argv[1:2] == ["machine"]:
        from bench import bench_machine

        return bench_machine.main(sys.argv[2:])
    if sys.argv[1:2] == ["memory"]:
        from bench import compare_memory

        return compare_memory.main(sys.argv[2:])
    for module, *args in BENCHMARKS:
        print(f"== {module} {' '.join(args)}", flush=True)
        result = subprocess.run([sys.executable, "-m", module, *args], check=False)
        if result.returncode != 0:
            print(f"{module} failed with exit code {result.returncode}", file=sys.stderr)
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
