"""The real image, built with buildah and run with podman as the chart runs it, does the whole job.

`make image`'s build (devtools/image.py: the Dockerfile as is, on a base image made from Debian
packages when no registry is reachable) is run once per session and its size reported. The chart
is installed on the local cluster with the image's reference; the operator container then runs
with what the chart's Deployment gives it (tests/image/container.py): the chart ServiceAccount's
token through the in-cluster path, read-only root filesystem, UID 65532, no capabilities, the
chart's webhook TLS Secret, and the operator's own web identity (IRSA-style projected token). The
AWS emulator and the API server run on the host.

One product is gated (Enforce, scope Pod) and metered (Replicas). The containerized operator must:
serve its admission webhook over TLS with the chart's certificate, for the chart's Service name;
register both pods, each with its own IRSA identity, and release them; sample the hour and send
exactly one MeterUsage for it as its own web identity. Its /metrics is then scraped and every
metric and label the chart's alert rules and dashboard use must be among what it exports.

The API server cannot reach a Service here (no kube-proxy), so the chart's
MutatingWebhookConfiguration is removed after install and the pod template carries the gate; the
webhook itself is called directly over TLS, checked against the chart's CA and Service DNS name.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from devtools import image as image_build
from devtools.cluster import ClusterInfo
from devtools.stack import free_port
from kubernetes import client

from metering_operator import __version__
from metering_operator.domain.product import LedgerState
from tests.chart.helmcli import Helm
from tests.chart.monitoring import check_queries_against_scrape
from tests.e2e.conftest import (  # noqa: F401  (fixtures, registered by importing them)
    BUYER_ACCOUNT,
    BUYER_ROLE,
    PRODUCT_CODE,
    TEST_REGION,
    emulator_config,
    metered_product_crd,
)
from tests.e2e.test_metering import H0, HOUR, PLAIN_REPLICAS_DIM, World, deployment
from tests.emulator.harness import EmulatorProcess, start_emulator
from tests.image.container import Container, chart_container

pytestmark = [pytest.mark.cluster, pytest.mark.image]

GATE = "marketplace.metering.dev/entitlement"
MWC = "MutatingWebhookConfiguration"
OPERATOR_ROLE = f"arn:aws:iam::{BUYER_ACCOUNT}:role/metering-operator"


@pytest.fixture(scope="session")
def built_image(request: pytest.FixtureRequest) -> str:
    """`make image`, once per session; its time and size go to the terminal report."""
    started = time.monotonic()
    ref = image_build.build()
    seconds = time.monotonic() - started
    size = image_build.image_size(ref)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"image {ref}: {size / 1e6:.1f} MB (built or reused in {seconds:.0f}s)")
    return ref


def test_image_carries_the_version_label_and_runs_as_65532(built_image: str) -> None:
    done = Container("inspect", []).podman("image", "inspect", built_image, check=True)
    (info,) = json.loads(done.stdout)
    config = info["Config"]
    assert config["Labels"]["org.opencontainers.image.version"] == __version__
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["metering-operator"]
    assert config["Cmd"] == ["run"]
    version = Container("version", []).podman(
        "run", "--rm", "--ulimit=nofile=1024:1024", "--ulimit=nproc=1024:1024", built_image, "--version"
    )
    assert version.stdout.strip() == f"metering-operator {__version__}", version.stderr
    # botocore was pruned to two service models: both clients, and the emulator's use of the
    # Metering model (the chart's in-cluster emulator runs this image), still load; pip is gone.
    probe = Container("probe", []).podman(
        "run",
        "--rm",
        "--ulimit=nofile=1024:1024",
        "--ulimit=nproc=1024:1024",
        "--entrypoint",
        "python",
        built_image,
        "-c",
        "import boto3, importlib.util; from metering_operator.emulator.validation import service_model; "
        f"[boto3.client(s, region_name='{TEST_REGION}') for s in ('meteringmarketplace', 'sts')]; "
        "[service_model(s).operation_names for s in ('meteringmarketplace', 'sts')]; "
        "print(importlib.util.find_spec('pip') is None)",
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "True", "the image should carry no pip"


@pytest.fixture
def product_emulator(cluster: ClusterInfo, namespace: str, tmp_path: Path) -> Iterator[EmulatorProcess]:
    trust_pods = [{"issuer": cluster.issuer, "subjects": ["system:serviceaccount:*"]}]
    operator_sa = f"system:serviceaccount:{namespace}:mmo-{namespace}"
    config = emulator_config(
        cluster,
        products=[
            {
                "productCode": PRODUCT_CODE,
                "publicKeyVersions": [1],
                "dimensions": [{"name": "replicas", "price": 0.25}],
                "entitledAccounts": [BUYER_ACCOUNT],
            }
        ],
        roles=[
            {"arn": BUYER_ROLE, "trust": trust_pods},
            # The operator's own identity (MeterUsage): only the chart's ServiceAccount may assume it.
            {"arn": OPERATOR_ROLE, "trust": [{"issuer": cluster.issuer, "subjects": [operator_sa]}]},
        ],
    )
    emulator = start_emulator(config, tmp_path / "emulator")
    try:
        yield emulator
    finally:
        emulator.stop()


def _webhook_review(namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "name": "probe",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def _call_webhook(manifest_webhook: dict[str, Any], ca_pem: bytes, port: int, review: dict[str, Any]) -> Any:
    """POST to the container's webhook over TLS, verified as the API server verifies the Service."""
    service = manifest_webhook["clientConfig"]["service"]
    hostname = f"{service['name']}.{service['namespace']}.svc"
    context = ssl.create_default_context(cadata=ca_pem.decode())
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{service['path']}",
        data=json.dumps(review).encode(),
        headers={"Content-Type": "application/json", "Host": hostname},
        method="POST",
    )

    # The certificate names the Service, not 127.0.0.1: check it against that name (SNI too).
    class ServiceNameHTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: urllib.request.Request) -> Any:
            class Connection(http.client.HTTPSConnection):
                def connect(self) -> None:
                    sock = socket.create_connection((self.host, self.port), self.timeout)
                    self.sock = context.wrap_socket(sock, server_hostname=hostname)

            return self.do_open(Connection, req)

    with urllib.request.build_opener(ServiceNameHTTPS()).open(request, timeout=15) as answer:
        return json.loads(answer.read())


def _wait(what: str, probe: Any, container: Container, timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except Exception:  # the API server or the container not there yet
            value = None
        if value:
            return value
        if not container.running():
            raise AssertionError(
                f"the operator container stopped while waiting for {what}:\n{container.log()}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{container.log()[-6000:]}")
        time.sleep(0.5)


def test_container_gates_registers_and_meters_as_the_chart_runs_it(
    built_image: str,
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    product_emulator: EmulatorProcess,
    tmp_path: Path,
) -> None:
    release = f"mmo-{namespace}"
    metrics_port, health_port, webhook_port = free_port(), free_port(), free_port()
    repository, _, tag = built_image.rpartition(":")
    values = {
        "fullnameOverride": release,
        "image": {"repository": repository},  # the tag defaults to the chart's appVersion
        "watchNamespaces": [namespace],
        "trustedProductCodes": [PRODUCT_CODE],
        "region": TEST_REGION,
        "logFormat": "text",
        "metrics": {"port": metrics_port},
        "health": {"port": health_port},
        # The webhook path of the gate (the chart's default on 1.37 is a MutatingAdmissionPolicy),
        # so the container serves admission with the chart's TLS Secret.
        "admissionPolicies": {"gate": "webhook"},
        "webhook": {"enabled": True, "port": webhook_port},
        "serviceAccount": {"roleArn": OPERATOR_ROLE},
        "webIdentityToken": {"inject": True},
        "extraEnv": [
            {"name": "AWS_ENDPOINT_URL_MARKETPLACE_METERING", "value": product_emulator.url},
            {"name": "AWS_ENDPOINT_URL_STS", "value": product_emulator.url},
        ],
        "extraArgs": [
            "--sample-interval-seconds=1",
            f"--emulator-clock-url={product_emulator.url}",
            "--lease-duration-seconds=5",
        ],
    }
    assert tag == __version__
    world = World(kube, namespace, product_emulator)
    world.set_clock(H0 + timedelta(minutes=1))
    container: Container | None = None
    try:
        cluster_helm.install(release, namespace, values=values)
        manifest = cluster_helm.run("get", "manifest", release, "--namespace", namespace).stdout
        import yaml

        (mwc,) = [
            d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "MutatingWebhookConfiguration"
        ]
        client.AdmissionregistrationV1Api(kube).delete_mutating_webhook_configuration(mwc["metadata"]["name"])

        # The seller's objects: key, IRSA-annotated ServiceAccount, the product, a gated Deployment.
        core = client.CoreV1Api(kube)
        pem = product_emulator.admin.public_key_pem(PRODUCT_CODE, 1)
        core.create_namespaced_config_map(
            namespace, {"metadata": {"name": "product-key"}, "data": {"public.pem": pem}}
        )
        core.create_namespaced_service_account(
            namespace,
            {"metadata": {"name": "product", "annotations": {"eks.amazonaws.com/role-arn": BUYER_ROLE}}},
        )
        world.create_product(
            {
                "apiVersion": "marketplace.metering.dev/v1alpha1",
                "kind": "MeteredProduct",
                "metadata": {"name": "db"},
                "spec": {
                    "productCode": PRODUCT_CODE,
                    "publicKeyVersion": 1,
                    "publicKey": {"configMapKeyRef": {"name": "product-key", "key": "public.pem"}},
                    "selector": {"matchLabels": {"app": "db"}},
                    "entitlement": {"mode": "Enforce", "scope": "Pod"},
                    "metering": {"dimensions": [PLAIN_REPLICAS_DIM]},
                },
            }
        )
        body = deployment("db", 2, "gold")
        body["spec"]["template"]["spec"]["serviceAccountName"] = "product"
        body["spec"]["template"]["spec"]["schedulingGates"] = [{"name": GATE}]
        world.create_deployment(body)

        # AWS throttles the first registrations: the operator retries, and counts the errors.
        product_emulator.admin.set_fault("RegisterUsage", throttle_rate=1.0)
        container = chart_container(cluster, kube, manifest, built_image, tmp_path / "pod").start()
        _wait(
            "the operator's /healthz",
            lambda: (
                urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=2).status == 200
            ),
            container,
        )

        # The root filesystem is read-only and the process is UID 65532.
        write = container.exec("sh", "-c", "touch /opt/venv/x")
        assert write.returncode != 0
        assert "Read-only file system" in write.stderr, write
        assert container.exec("id", "-u").stdout.strip() == "65532"

        # The webhook, over TLS with the chart's Secret, gates a product pod.
        ca = (container.mounts["/etc/metering-operator/webhook-tls"] / "ca.crt").read_bytes()
        review = _wait(
            "the webhook to add the gate",
            lambda: (
                answer
                if (
                    answer := _call_webhook(
                        mwc["webhooks"][0], ca, webhook_port, _webhook_review(namespace, {"app": "db"})
                    )
                )["response"].get("patch")
                else None
            ),
            container,
        )
        assert review["response"]["allowed"] is True
        import base64

        patch = json.loads(base64.b64decode(review["response"]["patch"]))
        assert GATE in json.dumps(patch), patch

        def scrape() -> str:
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return str(answer.read().decode())

        throttled = 'operation="RegisterUsage"'
        _wait(
            "throttled RegisterUsage calls in the metrics",
            lambda: any(
                line.startswith("marketplace_metering_aws_call_errors_total{") and throttled in line
                for line in scrape().splitlines()
            ),
            container,
        )
        product_emulator.admin.clear_faults()

        # Entitlement: both pods registered with their own identity and released.
        def granted() -> list[Any] | None:
            pods = core.list_namespaced_pod(namespace, label_selector="app=db").items
            done = [
                p
                for p in pods
                if (p.metadata.annotations or {}).get(GATE) == "Granted"
                and GATE not in {g.name for g in p.spec.scheduling_gates or []}
            ]
            return done if len(pods) == 2 and len(done) == 2 else None

        pods = _wait("both pods Granted and released", granted, container)
        registrations = product_emulator.admin.registrations(PRODUCT_CODE)
        for pod in pods:
            mine = [r for r in registrations if r["nonce"] == pod.metadata.uid]
            assert len(mine) == 1, registrations
            assert mine[0]["identity"].get("podUid") == pod.metadata.uid

        # Metering: the hour sampled, then one MeterUsage as the operator's own web identity.
        world.wait_observed(H0, {"replicas": "2"})
        world.set_clock(H0 + HOUR + timedelta(minutes=1))
        world.wait_entries(H0, LedgerState.SENT, ["replicas"], timeout=180)
        records = world.records()
        assert list(records) == [("replicas", H0)], records
        (record,) = records[("replicas", H0)]
        assert int(record["quantity"]) == 2
        assert record["account"] == BUYER_ACCOUNT
        assert record["callerKey"].startswith(OPERATOR_ROLE.replace(":role/", ":assumed-role/")) or (
            "metering-operator" in record["callerKey"]
        ), record

        # Operations: every metric and label the chart's rules and dashboard use is exported.
        # No pod ran without a grant and no pin is set here: those metrics have no series yet.
        quiet = {
            "marketplace_metering_ungated_pods_total",
            "marketplace_metering_pin_violations",
            "marketplace_metering_pinned_product_missing",
        }
        check_queries_against_scrape(scrape(), without_samples=frozenset(quiet))

        log = container.log()
        assert "Forbidden" not in log, log[-4000:]
        assert "Traceback" not in log, log[-6000:]
    finally:
        if container is not None:
            container.stop()
        cluster_helm.run("uninstall", release, "--namespace", namespace, "--ignore-not-found", check=False)
