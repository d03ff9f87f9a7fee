"""What a dimension measures, computed from compact views of the product's workloads and pods.

Sources (``spec.metering.dimensions[].source``):

* ``Replicas``: the desired replicas of the selected workloads (Deployments and StatefulSets:
  ``spec.replicas``; DaemonSets: ``status.desiredNumberScheduled``), i.e. what the buyer asked
  for, plus one for each selected pod that no workload owns. A workload is selected when its pod
  template's labels match the product's selector.
* ``ReadyPods``: selected pods whose ``Ready`` condition is True and that are not terminating.
* ``CPURequests`` / ``MemoryRequestsGiB``: the effective requests (Kubernetes' rule: the larger
  of the containers' sum, sidecars included, and any single init container) of the selected pods
  that are bound to a node and not finished, in cores and in GiB (2^30 bytes). A pod still held
  behind the entitlement gate requests nothing yet.

Values are exact Decimals (Kubernetes quantities parsed without floats), and each is split by
the dimension's allocation tags into "parts" whose sum is the value. The views are built from
API objects by pure functions here, so the Kubernetes adapter only has to keep them indexed.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from metering_operator.domain import allocation as alloc
from metering_operator.domain.ledger import Sample
from metering_operator.domain.product import DimensionSource, LabelSelector
from metering_operator.domain.selectors import matches

#: What a dimension measures: the spec's own enum, under the name sampling uses.
Source = DimensionSource

GIB = Decimal(2**30)
_SUFFIXES = {
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "E": Decimal(10**18),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:([eE][+-]?[0-9]+)|(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?)$")
# Wide enough for any realistic sum of bytes / 2^30 (which always terminates); Inexact is trapped
# so a quantity is never silently rounded.
_EXACT = decimal.Context(prec=120, traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")


class QuantityError(ValueError):
    """A Kubernetes resource quantity that does not parse."""


def parse_quantity(text: str | int | float) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``1.5``, ``512Mi``, ``1e3``) as an exact Decimal."""
    raw = str(text).strip()
    match = _QUANTITY.match(raw)
    if not match:
        raise QuantityError(f"not a Kubernetes quantity: {text!r}")
    number, exponent, suffix = match.groups()
    try:
        value = Decimal(number)
    except ArithmeticError:
        raise QuantityError(f"not a Kubernetes quantity: {text!r}") from None
    if exponent:
        return value.scaleb(int(exponent[1:]), _EXACT)
    return _EXACT.multiply(value, _SUFFIXES[suffix or ""])


@dataclass(frozen=True)
class PodView:
    """The few facts about a pod that sampling needs (kept per pod in the index, not the object)."""

    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]
    ready: bool
    terminating: bool
    bound: bool
    finished: bool
    cpu_cores: Decimal
    memory_bytes: Decimal
    owned: bool  # has a controller owner (ReplicaSet, StatefulSet, DaemonSet, Job, ...)


@dataclass(frozen=True)
class WorkloadView:
    kind: str
    namespace: str
    name: str
    template_labels: Mapping[str, str]
    desired: int
    owned: bool = False  # a ReplicaSet owned by a Deployment is counted through the Deployment


@dataclass(frozen=True)
class TagRule:
    """An allocation tag: value from the namespace (``label`` None) or from a label."""

    key: str
    label: str | None


def _requests(containers: Iterable[Mapping[str, Any]]) -> tuple[Decimal, Decimal]:
    cpu = Decimal(0)
    memory = Decimal(0)
    for container in containers:
        requests = (container.get("resources") or {}).get("requests") or {}
        if "cpu" in requests:
            cpu = _EXACT.add(cpu, parse_quantity(requests["cpu"]))
        if "memory" in requests:
            memory = _EXACT.add(memory, parse_quantity(requests["memory"]))
    return cpu, memory


def effective_requests(spec: Mapping[str, Any]) -> tuple[Decimal, Decimal]:
    """Kubernetes' effective pod requests (cores, bytes), overhead included."""
    init = list(spec.get("initContainers") or [])
    sidecars = [c for c in init if c.get("restartPolicy") == "Always"]
    cpu, memory = _requests([*(spec.get("containers") or []), *sidecars])
    running_sidecars: list[Mapping[str, Any]] = []
    for container in init:
        if container.get("restartPolicy") == "Always":
            running_sidecars.append(container)
            continue
        # A regular init container runs alongside the sidecars started before it.
        init_cpu, init_memory = _requests([container, *running_sidecars])
        cpu, memory = max(cpu, init_cpu), max(memory, init_memory)
    overhead = spec.get("overhead") or {}
    if "cpu" in overhead:
        cpu = _EXACT.add(cpu, parse_quantity(overhead["cpu"]))
    if "memory" in overhead:
        memory = _EXACT.add(memory, parse_quantity(overhead["memory"]))
    return cpu, memory


def pod_view(obj: Mapping[str, Any]) -> PodView:
    """Build the view from a pod as the API server sends it (a JSON dict)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    conditions = status.get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    cpu, memory = effective_requests(spec)
    owners = meta.get("ownerReferences") or []
    return PodView(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        labels=dict(meta.get("labels") or {}),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        bound=bool(spec.get("nodeName")),
        finished=status.get("phase") in ("Succeeded", "Failed"),
        cpu_cores=cpu,
        memory_bytes=memory,
        owned=any(o.get("controller") for o in owners),
    )


def workload_view(obj: Mapping[str, Any], kind: str) -> WorkloadView:
    """Build the view from a Deployment, StatefulSet, DaemonSet or ReplicaSet dict."""
    if kind not in WORKLOAD_KINDS:
        raise ValueError(f"unsupported workload kind {kind!r}; expected one of {WORKLOAD_KINDS}")
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    template_labels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
    if kind == "DaemonSet":
        desired = int(status.get("desiredNumberScheduled") or 0)
    else:
        replicas = spec.get("replicas")
        desired = 1 if replicas is None else int(replicas)  # the API default
    owners = meta.get("ownerReferences") or []
    return WorkloadView(
        kind=kind,
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        template_labels=dict(template_labels),
        desired=desired,
        owned=any(o.get("controller") for o in owners),
    )


def _tag_set(rules: Sequence[TagRule], namespace: str, labels: Mapping[str, str]) -> str:
    pairs = [(r.key, alloc.tag_value(namespace if r.label is None else labels.get(r.label))) for r in rules]
    return alloc.tag_key(alloc.normalise_tags(pairs))


def measure(
    source: Source | str,
    selector: LabelSelector,
    pods: Iterable[PodView],
    workloads: Iterable[WorkloadView] = (),
    tags: Sequence[TagRule] = (),
) -> Sample:
    """The dimension's value now, split by tag set when ``tags`` is not empty."""
    rule = Source(source)
    contributions: list[tuple[Decimal, str, Mapping[str, str]]] = []  # (value, namespace, labels)
    selected = [p for p in pods if matches(selector, p.labels)]
    if rule is Source.REPLICAS:
        for w in workloads:
            if not w.owned and matches(selector, w.template_labels):
                contributions.append((Decimal(w.desired), w.namespace, w.template_labels))
        for p in selected:
            if not p.owned and not p.terminating and not p.finished:
                contributions.append((Decimal(1), p.namespace, p.labels))
    elif rule is Source.READY_PODS:
        contributions = [
            (Decimal(1), p.namespace, p.labels) for p in selected if p.ready and not p.terminating
        ]
    else:
        running = [p for p in selected if p.bound and not p.finished]
        if rule is Source.CPU_REQUESTS:
            contributions = [(p.cpu_cores, p.namespace, p.labels) for p in running]
        else:
            contributions = [(_EXACT.divide(p.memory_bytes, GIB), p.namespace, p.labels) for p in running]
    total = Decimal(0)
    parts: dict[str, Decimal] = {}
    for value, namespace, labels in contributions:
        total = _EXACT.add(total, value)
        if tags:
            key = _tag_set(tags, namespace, labels)
            parts[key] = _EXACT.add(parts.get(key, Decimal(0)), value)
    return Sample(value=total, parts=parts)
