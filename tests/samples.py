"""Objects shared by the unit and end-to-end tests of the MeteredProduct API."""

from __future__ import annotations

import copy
from typing import Any

_STATUS_WIRE: dict[str, Any] = {
    "observedGeneration": 2,
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "Configured",
            "message": "ok",
            "observedGeneration": 2,
            "lastTransitionTime": "2026-11-26T03:04:05Z",
        }
    ],
    "pods": {"registered": 3, "pending": 1, "denied": 0},
    "metering": {
        "openHour": {
            "start": "2026-11-26T04:00:00Z",
            "dimensions": [
                {
                    "name": "replicas",
                    "lastValue": "3",
                    "lastSampleAt": "2026-11-26T04:10:00Z",
                    "weightedSum": "1800.000001",
                    "coveredSeconds": "600",
                    "maximum": "3",
                    "samples": 10,
                }
            ],
        },
        "ledger": [
            {
                "hour": "2026-11-26T03:00:00Z",
                "dimension": "replicas",
                "quantity": "17.50",
                "allocations": [{"tags": [{"key": "namespace", "value": "a"}], "quantity": "17.50"}],
                "state": "Sent",
                "meteringRecordId": "rec-1",
                "attempts": 1,
            }
        ],
        "lastSentHour": "2026-11-26T03:00:00Z",
    },
}


def status_wire() -> dict[str, Any]:
    """A full MeteredProduct status as the operator writes it (a fresh copy each call)."""
    return copy.deepcopy(_STATUS_WIRE)


def gated_deployment(
    name: str, replicas: int, labels: dict[str, str], gate: str, namespace: str | None = None
) -> dict[str, Any]:
    """A Deployment whose pod template carries the entitlement gate itself (tests that run the
    operator outside the cluster have no webhook to add it) and runs as ServiceAccount ``product``."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, **({"namespace": namespace} if namespace else {})},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "serviceAccountName": "product",
                    "schedulingGates": [{"name": gate}],
                    "containers": [{"name": "app", "image": "example.invalid/product:1"}],
                },
            },
        },
    }


def chart_sa_values(release: str, product_namespace: str, product_code: str) -> dict[str, Any]:
    """Helm values of the tests that run the operator outside the cluster with the chart's
    ServiceAccount token: no webhook (nothing in the cluster would answer it), one watched namespace
    and one trusted product code."""
    return {
        "fullnameOverride": release,
        "watchNamespaces": [product_namespace],
        "webhook": {"enabled": False},
        "trustedProductCodes": [product_code],
    }
