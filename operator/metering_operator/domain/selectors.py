"""Label selectors: match pod labels in Python, and render the server-side selector string.

The same selector is used twice: the admission webhook matches a new pod's labels against each
product in memory, and the pod watch sends it to the API server as ``labelSelector`` so only the
product's pods ever reach the operator (kopf's ``labels=`` filter works client-side, after every
pod in the cluster has been received).
"""

from __future__ import annotations

from collections.abc import Mapping

from metering_operator.domain.product import LabelSelector, LabelSelectorOperator


def matches(selector: LabelSelector, labels: Mapping[str, str] | None) -> bool:
    """Kubernetes LabelSelector semantics; an empty selector matches everything."""
    labels = labels or {}
    for key, value in selector.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in selector.match_expressions:
        present = req.key in labels
        if req.operator is LabelSelectorOperator.IN:
            if not present or labels[req.key] not in req.values:
                return False
        elif req.operator is LabelSelectorOperator.NOT_IN:
            if present and labels[req.key] in req.values:
                return False
        elif req.operator is LabelSelectorOperator.EXISTS:
            if not present:
                return False
        elif req.operator is LabelSelectorOperator.DOES_NOT_EXIST and present:
            return False
    return True


def to_query(selector: LabelSelector) -> str:
    """The ``labelSelector`` query string the API server understands ('' selects everything)."""
    parts = [f"{key}={value}" for key, value in sorted(selector.match_labels.items())]
    for req in selector.match_expressions:
        if req.operator is LabelSelectorOperator.IN:
            parts.append(f"{req.key} in ({','.join(sorted(req.values))})")
        elif req.operator is LabelSelectorOperator.NOT_IN:
            parts.append(f"{req.key} notin ({','.join(sorted(req.values))})")
        elif req.operator is LabelSelectorOperator.EXISTS:
            parts.append(req.key)
        else:
            parts.append(f"!{req.key}")
    return ",".join(parts)
