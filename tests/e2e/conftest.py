"""End-to-end fixtures: the operator as a real process against the local cluster and the emulator.

``operator`` is a factory (shared with the metering tests) that starts ``metering-operator run``
as a subprocess with the cluster's kubeconfig and unmodified boto3 pointed at an emulator
through ``AWS_ENDPOINT_URL_STS`` / ``AWS_ENDPOINT_URL_MARKETPLACE_METERING``::

    op = operator(namespace, emulator, extra_args=["--trusted-product-code", CODE], extra_env={...})
    op.wait_ready(); op.kill()  # SIGKILL
    op = op.restart()           # same arguments, new process (new port numbers are not needed)
    op.metrics()                # Prometheus text
    op.log()

``buyer_emulator`` starts an emulator that trusts the cluster's service-account issuer (fetching
its JWKS like STS does), with one product, an entitled buyer role and an unentitled one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from devtools.cluster import ClusterInfo
from devtools.stack import AWS_IDENTITY_VARIABLES, free_port, operator_command, strip_product_finalizers
from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.admission.install import delete as delete_policies
from metering_operator.domain.product import GROUP, PLURAL, VERSION
from tests.emulator.harness import EmulatorProcess, start_emulator

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "manifests" / "crd" / "meteredproducts.yaml"

#: A made-up Region for the emulator and the operator; tests pass it explicitly, nothing defaults to it.
TEST_REGION = "eu-north-7"
PRODUCT_CODE = "e2etestproduct0000000001"
#: A second product the same buyer is entitled to (tests that need two products' AWS calls apart).
OTHER_PRODUCT_CODE = "e2etestproduct0000000002"
BUYER_ACCOUNT = "111122223333"
OTHER_ACCOUNT = "999988887777"
BUYER_ROLE = f"arn:aws:iam::{BUYER_ACCOUNT}:role/buyer-product"
UNENTITLED_ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/unentitled-product"


#: How long a test waits for the operator to get somewhere (a bound, never a speed claim).
WAIT = 90.0


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT, interval: float = 0.2) -> Any:
    """Poll ``probe`` until it returns something truthy and return that; an API error counts
    as "not yet" (it is reported if the wait times out)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
        except ApiException as exc:
            value, last = None, exc
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last})")
        time.sleep(interval)


@pytest.fixture(scope="session")
def metered_product_crd(kube: client.ApiClient) -> dict[str, Any]:
    """The committed CRD, installed (or updated) and Established; left installed for others."""
    return install_crd(kube)


def install_crd(kube: client.ApiClient, crd_file: Path = CRD_FILE) -> dict[str, Any]:
    """Create or replace the MeteredProduct CRD (this tree's, or ``crd_file``) and wait until it
    is Established."""
    body: dict[str, Any] = yaml.safe_load(crd_file.read_text())
    ext = client.ApiextensionsV1Api(kube)
    try:
        ext.create_custom_resource_definition(body=body)
    except ApiException as err:
        if err.status != 409:
            raise
        current = ext.read_custom_resource_definition(body["metadata"]["name"])
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        ext.replace_custom_resource_definition(body["metadata"]["name"], body=body)
    deadline = time.monotonic() + 60
    while True:
        crd = ext.read_custom_resource_definition(body["metadata"]["name"])
        conditions = {c.type: c.status for c in (crd.status.conditions or [])}
        if conditions.get("Established") == "True":
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD not Established: {conditions}")
        time.sleep(0.2)


def emulator_config(cluster: ClusterInfo, **overrides: Any) -> dict[str, Any]:
    """An emulator that trusts the cluster's service-account issuer, like an EKS OIDC provider."""
    trust = [{"issuer": cluster.issuer, "subjects": ["system:serviceaccount:*"]}]
    config: dict[str, Any] = {
        "region": TEST_REGION,
        "products": [
            {"productCode": PRODUCT_CODE, "publicKeyVersions": [1], "entitledAccounts": [BUYER_ACCOUNT]},
            {
                "productCode": OTHER_PRODUCT_CODE,
                "publicKeyVersions": [1],
                "entitledAccounts": [BUYER_ACCOUNT],
            },
        ],
        "roles": [{"arn": BUYER_ROLE, "trust": trust}, {"arn": UNENTITLED_ROLE, "trust": trust}],
        "issuers": [{"issuer": cluster.issuer, "jwksUrl": cluster.jwks_uri, "caFile": str(cluster.ca_file)}],
    }
    config.update(overrides)
    return config


@pytest.fixture
def buyer_emulator(cluster: ClusterInfo, tmp_path: Path) -> Iterator[EmulatorProcess]:
    emulator = start_emulator(emulator_config(cluster), tmp_path / "emulator")
    try:
        yield emulator
    finally:
        emulator.stop()


@dataclass
class OperatorProcess:
    """One ``metering-operator run`` process (restartable with the same arguments)."""

    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    metrics_port: int
    health_port: int
    webhook_port: int | None
    webhook_configuration: str | None
    namespaces: list[str]
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> OperatorProcess:
        with self.log_path.open("ab") as log:
            log.write(f"\n===== start {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, timeout: float = 60.0) -> OperatorProcess:
        """Until kopf's liveness endpoint answers (handlers registered, watches started)."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while True:
            if not self.alive():
                raise RuntimeError(f"operator exited with {self.process.returncode}:\n{self.log()[-5000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200 and self._webhook_listening():
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"operator not ready after {timeout}s:\n{self.log()[-5000:]}")
            time.sleep(0.2)

    def _webhook_listening(self) -> bool:
        if self.webhook_port is None:
            return True
        try:
            with socket.create_connection(("127.0.0.1", self.webhook_port), timeout=1):
                return True
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup of any kind."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, kill: bool = False) -> OperatorProcess:
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()


OperatorFactory = Callable[..., OperatorProcess]


def launch_operator(
    cluster: ClusterInfo,
    namespace: str | Sequence[str],
    emulator: EmulatorProcess | None,
    log_path: Path,
    *,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
    webhook: bool = True,
    policies: bool = False,
) -> OperatorProcess:
    """Start ``metering-operator run`` for ``namespace`` (not waiting for readiness).

    Local mode installs the admission policies by default; tests of the operator's own logic run
    without them (``policies=False``), so a pod can be given exactly the state a test needs. The
    policies' own tests (tests/e2e/test_admission_policies.py, tests/chart) turn them on.
    """
    namespaces = [namespace] if isinstance(namespace, str) else list(namespace)
    metrics_port, health_port, webhook_port = free_port(), free_port(), free_port()
    mwc = f"mmo-e2e-{namespaces[0]}-{log_path.stem}" if webhook else None
    cmd = operator_command(
        TEST_REGION,
        namespaces,
        metrics_port=metrics_port,
        health_port=health_port,
        webhook_port=webhook_port,
        webhook_configuration=mwc,
        extra_args=[*extra_args, *([] if policies or not webhook else ["--no-admission-policies"])],
    )
    env = dict(os.environ)
    env.update(cluster.env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT / "operator"), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    # The operator's own identity: none (Pod scope signs with each pod's IRSA session).
    for var in AWS_IDENTITY_VARIABLES:
        env.pop(var, None)
    if emulator is not None:
        env.update(emulator.env(TEST_REGION))
    env.update(extra_env or {})
    proc = OperatorProcess(
        cmd, env, log_path, metrics_port, health_port, webhook_port if webhook else None, mwc, namespaces
    )
    return proc.start()


@pytest.fixture
def operator(
    cluster: ClusterInfo, kube: client.ApiClient, metered_product_crd: dict[str, Any], tmp_path: Path
) -> Iterator[OperatorFactory]:
    """Factory: ``operator(namespace, emulator, extra_args=(), extra_env=None, webhook=True, policies=...)``.

    Admission policies a local-mode operator installed stay after it stops (by design); the
    factory removes them at the end of the test.
    """
    started: list[OperatorProcess] = []

    def start(
        namespace: str | Sequence[str],
        emulator: EmulatorProcess | None,
        *,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        webhook: bool = True,
        policies: bool = False,
        wait: bool = True,
    ) -> OperatorProcess:
        proc = launch_operator(
            cluster,
            namespace,
            emulator,
            tmp_path / f"operator-{len(started)}.log",
            extra_args=extra_args,
            extra_env=extra_env,
            webhook=webhook,
            policies=policies,
        )
        started.append(proc)
        if wait:
            proc.wait_ready()
        return proc

    yield start

    admission = client.AdmissionregistrationV1Api(kube)
    for proc in started:
        remove_products(kube, proc.namespaces, operator_alive=proc.alive())
        proc.stop()
        if proc.webhook_configuration:
            try:
                admission.delete_mutating_webhook_configuration(proc.webhook_configuration)
            except ApiException as err:
                if err.status != 404:
                    raise
            # Named after the webhook configuration (the default --admission-policy-prefix).
            delete_policies(kube, proc.webhook_configuration)


def remove_products(kube: client.ApiClient, namespaces: Sequence[str], *, operator_alive: bool) -> None:
    """Delete the MeteredProducts so namespaces can go (kopf's finalizer needs a live operator)."""
    custom = client.CustomObjectsApi(kube)
    for ns in namespaces:
        try:
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        if not operator_alive:
            strip_product_finalizers(kube, ns)
        for item in items:
            name = item["metadata"]["name"]
            try:
                custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            except ApiException as err:
                if err.status != 404:
                    raise
        deadline = time.monotonic() + 15
        while custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]:
            if time.monotonic() > deadline:
                strip_product_finalizers(kube, ns)
                break
            time.sleep(0.2)
