"""The compact copy of a pod that the shared pod cache keeps: what the gate and metering read.

A pod as the API server sends it is a few kilobytes of JSON (tens of kilobytes as Python dicts:
containers, volumes, managed fields, status). The cache keeps, per selected pod, only:

* :attr:`CachedPod.gate` -- a pod-shaped dict with just the fields the entitlement gate's state
  machine, its effects and the registrar read (:mod:`metering_operator.domain.entitlement`,
  :mod:`metering_operator.gate`): name, namespace, uid, resourceVersion, creation and deletion
  timestamps, the operator's own annotations (``marketplace.metering.dev/...``; the
  ``annotations`` member stays absent when the pod has none, since the patch that adds the first
  one depends on it), controller owner references, scheduling gates, service account, and the
  phase only when it is final (``Succeeded``/``Failed``: all
  :func:`~metering_operator.domain.entitlement.is_terminating` asks of it). A field the gate starts
  reading must be added here (``tests/unit/test_cached_pod.py`` checks the gate's readers agree on
  both forms);
* :attr:`CachedPod.labels` -- the pod's labels, which the cache matches against its selectors (the
  gate never reads them: which product's pods it sees is the cache's business);
* :attr:`CachedPod.view` -- metering's :class:`~metering_operator.domain.sampling.PodView`.

Nothing the gate does not decide on is in :attr:`CachedPod.gate`: not the node a pod is bound to
(metering's ``PodView.bound`` has that), not a ``Pending``/``Running`` phase, not the pod's
conditions, not its labels (binding copies the node's ``topology.kubernetes.io/...`` labels onto
it). So the changes every granted pod goes through afterwards (the scheduler binds it, the kubelet
-- KWOK here -- marks it Running and Ready) leave its gate view as it was but for
``resourceVersion``, and :func:`same_for_gate` lets the pod cache keep them from the gate.

Pure: built from the raw JSON dict, which is then dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metering_operator.domain.product import GROUP
from metering_operator.domain.sampling import PodView, pod_view

_OWN_ANNOTATION_PREFIX = f"{GROUP}/"
_META_FIELDS = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp", "deletionTimestamp")
_SPEC_FIELDS = ("schedulingGates", "serviceAccountName")
#: The phases the gate reads (a pod that ran to an end holds nothing: ``entitlement.is_terminating``).
_FINAL_PHASES = frozenset({"Succeeded", "Failed"})
_ABSENT = object()


@dataclass(frozen=True, slots=True)
class CachedPod:
    uid: str
    resource_version: str
    labels: Mapping[str, str]
    gate: Mapping[str, Any]
    view: PodView


def compact(obj: Mapping[str, Any]) -> CachedPod:
    """The compact copy of ``obj`` (a pod dict as the API server sends it)."""
    view = pod_view(obj)
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    slim_meta: dict[str, Any] = {k: meta[k] for k in _META_FIELDS if k in meta}
    annotations = meta.get("annotations")
    if annotations is not None:
        slim_meta["annotations"] = {
            k: v for k, v in annotations.items() if k.startswith(_OWN_ANNOTATION_PREFIX)
        }
    owners = [
        {k: ref[k] for k in ("apiVersion", "kind", "name", "uid", "controller") if k in ref}
        for ref in meta.get("ownerReferences") or []
        if ref.get("controller")
    ]
    if owners:
        slim_meta["ownerReferences"] = owners
    slim: dict[str, Any] = {
        "metadata": slim_meta,
        "spec": {k: spec[k] for k in _SPEC_FIELDS if k in spec},
    }
    phase = (obj.get("status") or {}).get("phase")
    if phase in _FINAL_PHASES:
        slim["status"] = {"phase": phase}
    return CachedPod(
        uid=view.uid,
        resource_version=str(meta.get("resourceVersion") or ""),
        labels=view.labels,  # one dict, shared with the view
        gate=slim,
        view=view,
    )


def same_for_gate(old: CachedPod, new: CachedPod) -> bool:
    """Whether ``new`` shows the gate nothing ``old`` did not: their gate views are equal but for
    ``metadata.resourceVersion`` (a new version of the pod in which only fields the gate does not
    read changed -- binding, status -- or nothing at all)."""
    a, b = old.gate, new.gate
    if a.get("spec") != b.get("spec") or a.get("status") != b.get("status"):
        return False
    meta_a, meta_b = a["metadata"], b["metadata"]
    if len(meta_a) != len(meta_b):
        return False
    return all(key == "resourceVersion" or meta_b.get(key, _ABSENT) == value for key, value in meta_a.items())
