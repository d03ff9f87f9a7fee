"""The chart's webhook wiring against the real operator: certificate, CA, service name and path.

In a cluster the API server dials `https://<service>.<namespace>.svc:443<path>` and trusts the
configuration's caBundle. Containers cannot run on the fake nodes, so this test plays the API
server's part: the chart is rendered, the operator is started as a real process with the chart's
Secret as `--webhook-cert-dir` (as the Deployment mounts it), and an AdmissionReview for a product
pod is sent over TLS verified against the rendered caBundle with the Service's DNS name as the
TLS server name, to the path the configuration names. The operator must answer with a patch that
adds the entitlement gate, and must leave a pod of no product alone.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import urllib3
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from devtools.cluster import ClusterInfo
from devtools.stack import free_port
from kubernetes import client

from tests.chart.helmcli import REPO, Helm, one
from tests.e2e.conftest import metered_product_crd  # noqa: F401  (fixture)

pytestmark = pytest.mark.cluster

GATE = "marketplace.metering.dev/entitlement"
LABELS = {"app.kubernetes.io/name": "webhook-wiring-product"}


def admission_review(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    uid = str(uuid.uuid4())
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"p-{uid[:8]}", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": pod["metadata"]["name"],
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def test_operator_serves_the_charts_webhook_with_the_charts_certificate(
    cluster: ClusterInfo,
    helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    tmp_path: Path,
) -> None:
    # The webhook path (servers before 1.36; this one would get the MutatingAdmissionPolicy).
    objects = helm.render(release="mmo", namespace=namespace, set_values=["admissionPolicies.gate=webhook"])
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    service_ref = webhook["clientConfig"]["service"]
    secret = one(objects, "Secret")
    deployment = one(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "webhook-tls")
    cert_flag = next(a for a in container["args"] if a.startswith("--webhook-cert-dir="))
    assert cert_flag == f"--webhook-cert-dir={mount['mountPath']}"

    # The Secret's files, as the pod sees them under the mount.
    cert_dir = tmp_path / "webhook-tls"
    cert_dir.mkdir()
    for key, value in secret["data"].items():
        (cert_dir / key).write_bytes(base64.b64decode(value))
    ca_file = tmp_path / "ca-bundle.pem"
    ca_file.write_bytes(base64.b64decode(webhook["clientConfig"]["caBundle"]))

    # An Enforce-mode product in the namespace (its key is never used: no pod is registered here).
    key_pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "marketplace.metering.dev",
        "v1alpha1",
        namespace,
        "meteredproducts",
        {
            "apiVersion": "marketplace.metering.dev/v1alpha1",
            "kind": "MeteredProduct",
            "metadata": {"name": "wiring"},
            "spec": {
                "productCode": "webhookwiring0001",
                "publicKeyVersion": 1,
                "publicKey": {"pem": key_pem},
                "selector": {"matchLabels": LABELS},
                "entitlement": {"mode": "Enforce", "scope": "Pod"},
            },
        },
    )

    port, metrics_port, health_port = free_port(), free_port(), free_port()
    env = {**os.environ, **cluster.env(), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO / "operator"), env.get("PYTHONPATH")] if p)
    log_path = tmp_path / "operator.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "metering_operator.cli", "run",
                "--region", "eu-north-7",
                "--namespace", namespace,
                "--metrics-port", str(metrics_port),
                "--health-port", str(health_port),
                "--webhook-host", "127.0.0.1",
                "--webhook-port", str(port),
                f"--webhook-cert-dir={cert_dir}",
            ],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        server_name = f"{service_ref['name']}.{service_ref['namespace']}.svc"
        pool = urllib3.HTTPSConnectionPool(
            "127.0.0.1",
            port,
            ca_certs=str(ca_file),
            cert_reqs="CERT_REQUIRED",
            server_hostname=server_name,
            assert_hostname=server_name,
            retries=False,
            timeout=5.0,
        )

        def review(labels: dict[str, str]) -> dict[str, Any]:
            body = admission_review(namespace, labels)
            answer = pool.request(
                "POST",
                service_ref["path"],
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status == 200, answer.data[:500]
            response: dict[str, Any] = json.loads(answer.data)["response"]
            assert response["uid"] == body["request"]["uid"]
            assert response["allowed"] is True
            return response

        def gates(response: dict[str, Any]) -> list[str]:
            if "patch" not in response:
                return []
            assert response["patchType"] == "JSONPatch"
            ops = json.loads(base64.b64decode(response["patch"]))
            return [
                gate["name"]
                for op in ops
                if op["path"].startswith("/spec/schedulingGates")
                for gate in (op["value"] if isinstance(op["value"], list) else [op["value"]])
            ]

        # The product reaches the operator's index shortly after start; until then pods pass.
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise AssertionError(f"operator exited {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if gates(review(LABELS)) == [GATE]:
                    break
            except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ProtocolError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the operator never gated a product pod:\n{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.5)

        assert gates(review({"app": "something-else"})) == [], "a pod of no product must pass untouched"
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
