"""The compact copy of a pod that the shared pod cache keeps: what the gate and metering read.

A pod as the API server sends it is a few kilobytes of JSON (tens of kilobytes as Python dicts:
containers, volumes, managed fields, status). The cache keeps, per selected pod, only:

* :attr:`CachedPod.gate` -- a pod-shaped dict with just the fields the entitlement gate's state
  machine, its effects and the registrar read (:mod:`metering_operator.domain.entitlement`,
  :mod:`metering_operator.gate`): name, namespace, uid, resourceVersion, creation and deletion
  timestamps, labels, the operator's own annotations (``marketplace.metering.dev/...``; the
  ``annotations`` member stays absent when the pod has none, since the patch that adds the first
  one depends on it), controller owner references, scheduling gates, service account, node and
  phase. A field the gate starts reading must be added here (``tests/unit/test_cached_pod.py``
  checks the gate's readers agree on both forms);
* :attr:`CachedPod.view` -- metering's :class:`~metering_operator.domain.sampling.PodView`.

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
_SPEC_FIELDS = ("schedulingGates", "serviceAccountName", "nodeName")


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
    slim_meta["labels"] = view.labels  # one dict, shared with the view
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
    if phase is not None:
        slim["status"] = {"phase": phase}
    return CachedPod(
        uid=view.uid,
        resource_version=str(meta.get("resourceVersion") or ""),
        labels=view.labels,
        gate=slim,
        view=view,
    )
