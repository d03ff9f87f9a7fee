"""Dimension sources measured from pod and workload views built from API-shaped dicts."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from metering_operator.domain.allocation import parse_tag_key
from metering_operator.domain.product import LabelSelector
from metering_operator.domain.sampling import (
    QuantityError,
    TagRule,
    effective_requests,
    measure,
    parse_quantity,
    pod_view,
    workload_view,
)

SEL = LabelSelector.model_validate({"matchLabels": {"app": "db"}})


def pod(
    name: str,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    node: str | None = "node-1",
    phase: str = "Running",
    cpu: str | None = "500m",
    memory: str | None = "512Mi",
    owned: bool = True,
    deleting: bool = False,
) -> dict[str, Any]:
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v is not None}
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "shop",
        "uid": f"uid-{name}",
        "labels": {"app": "db", **(labels or {})},
    }
    if owned:
        meta["ownerReferences"] = [{"kind": "ReplicaSet", "name": "db-1", "controller": True}]
    if deleting:
        meta["deletionTimestamp"] = "2026-11-26T10:00:00Z"
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": requests}}]},
        "status": {"phase": phase, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def deployment(name: str, replicas: int | None, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"template": {"metadata": {"labels": {"app": "db", **(labels or {})}}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"metadata": {"name": name, "namespace": "shop"}, "spec": spec}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("500m", Decimal("0.5")),
        ("2", Decimal(2)),
        ("1.5", Decimal("1.5")),
        ("512Mi", Decimal(2**29)),
        ("1Gi", Decimal(2**30)),
        ("1G", Decimal(10**9)),
        ("100k", Decimal(100_000)),
        ("1e3", Decimal(1000)),
        ("250u", Decimal("0.00025")),
        (3, Decimal(3)),
    ],
)
def test_parse_quantity(text: str, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1Zi", "1.2.3", "--1"])
def test_bad_quantities_are_refused(text: str) -> None:
    with pytest.raises(QuantityError, match="not a Kubernetes quantity"):
        parse_quantity(text)


def test_effective_requests_follow_the_init_container_rule() -> None:
    spec = {
        "containers": [{"resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}],
        "initContainers": [
            {"resources": {"requests": {"cpu": "3", "memory": "100Mi"}}},
            {"restartPolicy": "Always", "resources": {"requests": {"cpu": "250m"}}},
        ],
        "overhead": {"cpu": "100m"},
    }
    cpu, memory = effective_requests(spec)
    assert cpu == Decimal("3.1")  # max(1 + 0.25 sidecar, 3 init) + 0.1 overhead
    assert memory == Decimal(2**30)


def test_replicas_counts_desired_workload_replicas_and_bare_pods() -> None:
    workloads = [
        workload_view(deployment("db", 5), "Deployment"),
        workload_view(deployment("other", 7, {"app": "web"}), "Deployment"),  # template does not match
        workload_view(deployment("default-replicas", None), "Deployment"),
    ]
    pods = [pod("db-a"), pod("bare", owned=False), pod("bare-done", owned=False, phase="Succeeded")]
    assert measure("Replicas", SEL, [pod_view(p) for p in pods], workloads).value == 5 + 1 + 1


def test_daemonset_desired_comes_from_status() -> None:
    ds = deployment("agent", None)
    ds["status"] = {"desiredNumberScheduled": 4}
    assert measure("Replicas", SEL, [], [workload_view(ds, "DaemonSet")]).value == 4
    with pytest.raises(ValueError, match="unsupported workload kind"):
        workload_view(ds, "CronJob")


def test_ready_pods_skip_unready_terminating_and_unselected() -> None:
    pods = [
        pod("a"),
        pod("b", ready=False),
        pod("c", deleting=True),
        pod("d"),
    ]
    views = [pod_view(p) for p in pods]
    unselected = pod_view(pod("e"))
    unselected = type(unselected)(**{**unselected.__dict__, "labels": {"app": "web"}})
    assert measure("ReadyPods", SEL, [*views, unselected]).value == 2


def test_cpu_and_memory_requests_of_bound_running_pods() -> None:
    pods = [
        pod("a"),
        pod("b", cpu="1500m", memory="1Gi"),
        pod("gated", node=None),
        pod("done", phase="Failed"),
    ]
    views = [pod_view(p) for p in pods]
    assert measure("CPURequests", SEL, views).value == Decimal(2)
    assert measure("MemoryRequestsGiB", SEL, views).value == Decimal("1.5")


def test_memory_in_gib_is_exact() -> None:
    views = [pod_view(pod("a", memory="1073741825"))]  # 1 GiB + 1 byte
    assert measure("MemoryRequestsGiB", SEL, views).value == Decimal("1.000000000931322574615478515625")


def test_parts_split_by_namespace_and_label_and_sum_to_the_total() -> None:
    tags = [TagRule("namespace", None), TagRule("team", "team")]
    pods = [
        pod("a", labels={"team": "red"}),
        pod("b", labels={"team": "red"}),
        pod("c"),
        pod("d", ready=False),
    ]
    sample = measure("ReadyPods", SEL, [pod_view(p) for p in pods], tags=tags)
    parts = {tuple(v for _, v in parse_tag_key(k)): v for k, v in sample.parts.items()}
    assert parts == {("shop", "red"): 2, ("shop", "none"): 1}
    assert sum(sample.parts.values()) == sample.value == 3
    assert measure("ReadyPods", SEL, [pod_view(p) for p in pods]).parts == {}
