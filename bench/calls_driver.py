"""One variant's side of bench/bench_calls.py: the gate's five per-pod calls, timed one by one.

Run by bench/bench_calls.py in a subprocess whose ``PYTHONPATH`` is the variant's ``operator/``;
prints one JSON line. Per pod, in one thread and in the gate's order, through the operator's own
objects (built as gate/registrar.py and the gate build them): the pod-bound TokenRequest, STS
AssumeRoleWithWebIdentity (the IRSA cache, empty for the pod), RegisterUsage through the per-call
signing client, a JSON patch of the pod (an annotation, the grant patch's size: the pods carry a
second scheduling gate so no scheduling starts), and the ``Registered`` Event. The first
``--warmup`` pods are not counted (connections, clients, caches). CPU is the thread's
(``time.thread_time``), so the emulator and API server are not in it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

from kubernetes import config

import metering_operator
from metering_operator.aws.errors import MeteringError
from metering_operator.aws.models import RegisterUsageRequest
from metering_operator.domain.clock import SystemClock
from metering_operator.domain.signature import ProductKey, load_public_key
from metering_operator.gate.registrar import Registrar
from metering_operator.kube.events import EventPoster
from metering_operator.kube.pods import PodApi, object_ref
from metering_operator.kube.tokens import request_pod_token

T = TypeVar("T")
CALLS = ("TokenRequest", "STS AssumeRoleWithWebIdentity", "RegisterUsage", "pod JSON patch", "Event")


def _same(ops: list[dict[str, Any]], _pod: Any) -> list[dict[str, Any]]:
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--region", required=True)
    parser.add_argument("--product-code", required=True)
    parser.add_argument("--public-key", required=True, help="PEM file")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--profile", default="", help="write a cProfile of the timed pods here")
    args = parser.parse_args(argv)
    profiler = cProfile.Profile(time.thread_time) if args.profile else None

    api = config.new_client_from_config(config_file=args.kubeconfig)
    with open(args.public_key) as pem:
        key = ProductKey(args.product_code, 1, load_public_key(pem.read()))
    pods = PodApi(api)
    registrar = Registrar(api, pods, args.region, SystemClock())
    events = EventPoster(api)
    items, _ = pods.list(args.namespace, f"app={args.label}")
    items.sort(key=lambda p: p["metadata"]["name"])
    role_arn = registrar.role_arn(args.namespace, "buyer")
    assert role_arn, "service account buyer has no role ARN"
    retries = 0

    def retrying(call: Callable[[], T]) -> T:
        nonlocal retries
        for attempt in range(3):
            try:
                return call()
            except MeteringError as exc:
                if not exc.retryable or attempt == 2:
                    raise
                retries += 1
        raise AssertionError("unreachable")

    cpu: dict[str, list[float]] = {name: [] for name in CALLS}
    wall: dict[str, list[float]] = {name: [] for name in CALLS}
    for i, pod in enumerate(items):
        meta = pod["metadata"]
        uid = meta["uid"]
        marks = [(time.thread_time(), time.perf_counter())]
        token = request_pod_token(
            api,
            namespace=args.namespace,
            service_account="buyer",
            pod_name=meta["name"],
            pod_uid=uid,
            raw=pods.raw,
        )
        marks.append((time.thread_time(), time.perf_counter()))
        creds = retrying(partial(registrar.credentials.get, role_arn, uid, partial(str, token)))
        marks.append((time.thread_time(), time.perf_counter()))
        metering = registrar.factory.for_credentials(creds)
        request = RegisterUsageRequest(product_code=key.product_code, public_key_version=1, nonce=uid)
        result = retrying(partial(metering.register_usage, request))
        marks.append((time.thread_time(), time.perf_counter()))
        key.verify(result.signature, uid)  # not timed: no request
        marks.append((time.thread_time(), time.perf_counter()))
        ops = [
            {
                "op": "add",
                "path": "/metadata/annotations",
                "value": {"bench.calls/signature": result.signature},
            }
        ]
        pods.write_with_retry(pod, partial(_same, ops))
        marks.append((time.thread_time(), time.perf_counter()))
        events.post(object_ref(pod, "Pod", "v1"), "Normal", "Registered", "RegisterUsage granted")
        marks.append((time.thread_time(), time.perf_counter()))
        if i < args.warmup:
            if i == args.warmup - 1 and profiler is not None:
                profiler.enable()
            continue
        spans = [(marks[k], marks[k + 1]) for k in (0, 1, 2, 4, 5)]
        for name, (a, b) in zip(CALLS, spans, strict=True):
            cpu[name].append((b[0] - a[0]) * 1e3)
            wall[name].append((b[1] - a[1]) * 1e3)
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
    row: dict[str, Any] = {
        "source": metering_operator.__file__,
        "pods": len(items) - args.warmup,
        "retries": retries,
        "cpu_mean": {k: statistics.fmean(v) for k, v in cpu.items()},
        "cpu_median": {k: statistics.median(v) for k, v in cpu.items()},
        "wall_median": {k: statistics.median(v) for k, v in wall.items()},
    }
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
