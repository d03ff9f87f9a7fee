"""The Kubernetes client's generated classes are imported on first use (kube/lazyclient.py).

Run in a fresh interpreter: this test process has imported the client eagerly already.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

OPERATOR = Path(__file__).resolve().parents[2] / "operator"

PROBE = """
import json, sys
from metering_operator.kube import lazyclient
installed = lazyclient.install()
import kopf  # imports the client too when it is installed
from kubernetes import client
import kubernetes.client.models
before = len([m for m in sys.modules if m.startswith("kubernetes.client.models.")])
api = client.ApiClient()
pod = api._ApiClient__deserialize({"metadata": {"name": "p", "labels": {"a": "b"}}}, "V1Pod")
from kubernetes.client import V1OwnerReference
print(json.dumps({
    "installed": installed,
    "again": lazyclient.install(),
    "models_before": before,
    "models_after": len([m for m in sys.modules if m.startswith("kubernetes.client.models.")]),
    "pod": [type(pod).__name__, pod.metadata.name, api.sanitize_for_serialization(pod)["metadata"]],
    "names": [client.CoreV1Api.__name__, client.ApiException.__name__, V1OwnerReference.__name__],
    "in_dir": "V1Pod" in dir(kubernetes.client.models),
}))
"""


def test_classes_are_imported_when_used_and_work_as_before() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={"PYTHONPATH": str(OPERATOR)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["installed"] is True
    assert result["again"] is False
    assert result["models_before"] < 10  # of about 770: only what kopf itself names
    assert result["models_after"] < 20
    assert result["pod"] == ["V1Pod", "p", {"name": "p", "labels": {"a": "b"}}]
    assert result["names"] == ["CoreV1Api", "ApiException", "V1OwnerReference"]
    assert result["in_dir"] is True
