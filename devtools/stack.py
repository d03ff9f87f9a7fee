"""Run the whole local stack as real processes: the AWS emulator, the operator, kubectl.

Reusable orchestration for the demo (``devtools/demo.py``) and for anything else that wants the
product running the way a developer runs it by hand, with no pytest in the way:

    emu = start_emulator(config, work_dir / "emulator-state", work_dir / "emulator.log")
    op = start_operator(cluster, emu, ["shop"], work_dir / "operator.log", region=emu.region)
    op.wait_ready(); ...; op.stop(); emu.stop()
    Kubectl(cluster).apply([namespace, service_account, ...], namespace="shop")

Both services are started exactly as ``tests/e2e/conftest.py`` starts them (``python -m
metering_operator.cli ...`` with ``operator/`` on PYTHONPATH, unmodified boto3 pointed at the
emulator through ``AWS_ENDPOINT_URL_STS`` / ``_MARKETPLACE_METERING`` / ``_LICENSE_MANAGER``, the
Region given explicitly, no AWS identity inherited from the caller's environment), so what works
here works there, and the e2e fixtures and the emulator's test harness use its command line,
admin-API transport and clean-up helpers. It imports nothing from ``tests/``, and from the
operator package only the API's names (group, version, plural); it drives the operator and the
emulator through their command lines and HTTP APIs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from devtools.cluster import ClusterInfo
from metering_operator.domain.product import GROUP, PLURAL, VERSION

REPO_ROOT = Path(__file__).resolve().parent.parent
LISTENING_PREFIX = "emulator listening on "
#: Variables that would give the operator an AWS identity the caller happened to have.
AWS_IDENTITY_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)

T = TypeVar("T")


class StackError(RuntimeError):
    """A part of the stack did not start, or did not reach a state in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.2,
    alive: Callable[[], str | None] | None = None,
) -> T:
    """Poll ``probe`` until it returns something truthy; StackError naming ``what`` on timeout.

    Other exceptions from ``probe`` count as "not yet" (the last is reported on timeout), except
    StackError, which a probe raises when waiting longer cannot help.

    ``alive`` returns a message when a process the wait depends on has died, so a crash is
    reported at once instead of after the whole timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
        except StackError:
            raise  # the probe knows waiting cannot help (e.g. a pod was denied)
        except Exception as exc:  # a probe's transient failure (API server busy) is retried
            value, last_error = None, exc
        if value:
            return value
        if alive is not None:
            dead = alive()
            if dead:
                raise StackError(f"{what}: {dead}")
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT / "operator"), env.get("PYTHONPATH")] if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no log)"


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return int(process.returncode)


# ---------------------------------------------------------------------------------------------
# The emulator


class AdminError(StackError):
    """The emulator's admin API answered with an error status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"emulator admin {method} {path}: {status} {body}")
        self.status = status
        self.body = body


def admin_request(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    query: Mapping[str, str | None] | None = None,
    timeout: float = 30.0,
) -> Any:
    """One call to the emulator's ``/_emulator/`` JSON API: the decoded answer, or AdminError."""
    url = base + path
    params = {k: v for k, v in (query or {}).items() if v is not None}
    if params:
        url += "?" + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        raise AdminError(method, path, exc.code, exc.read().decode(errors="replace")) from None
    if "json" in ctype:
        return json.loads(raw) if raw else None
    return raw.decode()


def all_events(
    base: str, operation: str | None = None, error_code: str | None = None, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """Every retained event of the emulator's log, oldest first, read page by page."""
    events: list[dict[str, Any]] = []
    since = 0
    while True:
        query = {"operation": operation, "errorCode": error_code, "since": str(since), "limit": "1000"}
        page = admin_request(base, "GET", "/events", None, query, timeout)
        events += page["events"]
        if not page.get("more"):
            return events
        since = int(page["nextSince"])


class EmulatorAdmin:
    """The emulator's ``/_emulator/`` JSON API (docs/emulator.md), the calls the stack needs."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.base = url.rstrip("/") + "/_emulator"
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, **query: str | None) -> Any:
        return admin_request(self.base, method, path, body, query, self.timeout)

    def health(self) -> dict[str, Any]:
        return dict(self.request("GET", "/health"))

    def clock(self) -> datetime:
        return datetime.fromisoformat(self.request("GET", "/clock")["now"])

    def set_clock(self, now: datetime) -> datetime:
        if now.tzinfo is None:
            raise ValueError("set_clock needs an aware (UTC) datetime")
        return datetime.fromisoformat(self.request("POST", "/clock", {"now": now.isoformat()})["now"])

    def registrations(self, product_code: str | None = None) -> list[dict[str, Any]]:
        return list(self.request("GET", "/registrations", productCode=product_code)["registrations"])

    def meter_records(self, product_code: str | None = None) -> list[dict[str, Any]]:
        return list(self.request("GET", "/meter-records", productCode=product_code)["records"])

    def billing(self, product_code: str | None = None) -> dict[str, Any]:
        return dict(self.request("GET", "/billing", productCode=product_code))

    def events(self, operation: str | None = None, error_code: str | None = None) -> list[dict[str, Any]]:
        return all_events(self.base, operation, error_code, self.timeout)

    def public_key_pem(self, product_code: str, version: int) -> str:
        path = f"/products/{urllib.parse.quote(product_code, safe='')}/keys/{version}.pem"
        return str(self.request("GET", path))

    def license_checkouts(self, license_arn: str | None = None) -> list[dict[str, Any]]:
        return list(self.request("GET", "/license-checkouts", licenseArn=license_arn)["checkouts"])

    def seat_usage(self, license_arn: str | None = None) -> list[dict[str, Any]]:
        """The billing view's License Manager part: per contract and entitlement, seats in use now."""
        return list(self.request("GET", "/billing", licenseArn=license_arn).get("licenses") or [])

    def issuer_key_pem(self, key_fingerprint: str) -> str:
        path = f"/license-issuers/{urllib.parse.quote(key_fingerprint, safe='')}/key.pem"
        return str(self.request("GET", path))


@dataclass
class Emulator:
    """A running ``metering-operator emulator`` process."""

    url: str
    region: str | None
    process: subprocess.Popen[bytes]
    log_path: Path
    state_dir: Path
    config_path: Path
    admin: EmulatorAdmin = field(init=False)

    def __post_init__(self) -> None:
        self.admin = EmulatorAdmin(self.url)

    def env(self) -> dict[str, str]:
        """Variables that point unmodified boto3 at this emulator, Region included."""
        env = {
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": self.url,
            "AWS_ENDPOINT_URL_LICENSE_MANAGER": self.url,
            "AWS_ENDPOINT_URL_STS": self.url,
        }
        if self.region:
            # botocore 1.44 reads AWS_DEFAULT_REGION; EKS's IRSA webhook sets both.
            env["AWS_DEFAULT_REGION"] = self.region
            env["AWS_REGION"] = self.region
        return env

    def dead(self) -> str | None:
        """None while running; otherwise why it stopped, with the end of its log."""
        if self.process.poll() is None:
            return None
        return f"the emulator exited with {self.process.returncode}:\n{_log_tail(self.log_path)}"

    def stop(self, timeout: float = 10.0) -> int:
        return _terminate(self.process, timeout)


def start_emulator(
    config: dict[str, Any], state_dir: Path, log_path: Path, *, timeout: float = 30.0
) -> Emulator:
    """Write ``config`` beside the state dir, run the emulator on a free port, wait for its URL."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    config_path = state_dir.parent / f"{state_dir.name}-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        sys.executable,
        "-m",
        "metering_operator.cli",
        "emulator",
        "--config",
        str(config_path),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--state-dir",
        str(state_dir),
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True
        )

    def listening() -> str | None:
        for line in _log_tail(log_path, 1_000_000).splitlines():
            if line.startswith(LISTENING_PREFIX):
                return line[len(LISTENING_PREFIX) :].strip()
        return None

    def dead() -> str | None:
        code = process.poll()
        return None if code is None else f"exited with {code}:\n{_log_tail(log_path)}"

    try:
        url = wait_until("the emulator to listen", listening, timeout, interval=0.05, alive=dead)
    except BaseException:
        _terminate(process, 5)
        raise
    region = config.get("region")
    return Emulator(url, str(region) if region else None, process, log_path, state_dir, config_path)


def cluster_emulator_config(
    cluster: ClusterInfo,
    *,
    region: str,
    products: Sequence[dict[str, Any]],
    roles: Sequence[dict[str, Any]],
    **extra: Any,
) -> dict[str, Any]:
    """An emulator configuration whose STS trusts the cluster's service-account issuer.

    As an EKS cluster's OIDC provider is registered in IAM, the cluster's issuer is configured
    with its JWKS URL (served by the API server, fetched by the emulator like STS fetches it).
    Each role's ``trust`` defaults to that issuer.
    """
    issuer = {"issuer": cluster.issuer, "jwksUrl": cluster.jwks_uri, "caFile": str(cluster.ca_file)}
    trusted_roles = []
    for role in roles:
        role = dict(role)
        role.setdefault("trust", [{"issuer": cluster.issuer, "subjects": ["system:serviceaccount:*"]}])
        trusted_roles.append(role)
    return {
        "region": region,
        "products": list(products),
        "roles": trusted_roles,
        "issuers": [issuer],
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# The operator


@dataclass
class Operator:
    """A running ``metering-operator run`` process."""

    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    namespaces: list[str]
    metrics_port: int
    health_port: int
    webhook_port: int | None
    webhook_configuration: str | None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Operator:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"===== {time.strftime('%H:%M:%S')} {' '.join(self.cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def dead(self) -> str | None:
        """None while running; otherwise why it stopped, with the end of its log."""
        if self.process is None:
            return "the operator was never started"
        if self.process.poll() is None:
            return None
        return f"the operator exited with {self.process.returncode}:\n{_log_tail(self.log_path)}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until kopf's liveness endpoint answers and the webhook port accepts connections."""
        url = f"http://127.0.0.1:{self.health_port}/healthz"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status != 200:
                    return False
            if self.webhook_port is not None:
                with socket.create_connection(("127.0.0.1", self.webhook_port), timeout=1):
                    pass
            return True

        wait_until("the operator to be ready", ready, timeout, alive=self.dead)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.process is None:
            return None
        return _terminate(self.process, timeout)


def operator_env(
    cluster: ClusterInfo, emulator: Emulator | None, extra_env: dict[str, str] | None = None
) -> dict[str, str]:
    """The operator's environment: the cluster's kubeconfig, the emulator's endpoints, no AWS identity."""
    env = _child_env(cluster.env())
    for var in AWS_IDENTITY_VARIABLES:
        env.pop(var, None)
    if emulator is not None:
        env.update(emulator.env())
    env.update(extra_env or {})
    return env


def operator_command(
    region: str,
    namespaces: Sequence[str],
    *,
    metrics_port: int,
    health_port: int,
    webhook_port: int | None,
    webhook_configuration: str | None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``metering-operator run`` command line for a local cluster on 127.0.0.1.

    With a webhook port and configuration name the operator serves its admission webhook there
    and manages that MutatingWebhookConfiguration itself (local mode); otherwise ``--no-webhook``.
    """
    cmd = [sys.executable, "-m", "metering_operator.cli", "run", "--region", region]
    cmd += ["--metrics-port", str(metrics_port), "--health-port", str(health_port)]
    for ns in namespaces:
        cmd += ["--namespace", ns]
    if webhook_port is not None and webhook_configuration:
        cmd += ["--webhook-host", "127.0.0.1", "--webhook-port", str(webhook_port)]
        cmd += ["--webhook-url", f"https://127.0.0.1:{webhook_port}"]
        cmd += ["--webhook-configuration-name", webhook_configuration]
    else:
        cmd += ["--no-webhook"]
    return cmd + list(extra_args)


def start_operator(
    cluster: ClusterInfo,
    emulator: Emulator | None,
    namespaces: Sequence[str],
    log_path: Path,
    *,
    region: str,
    webhook_configuration: str | None = None,
    extra_args: Sequence[str] = (),
    extra_env: dict[str, str] | None = None,
) -> Operator:
    """Start ``metering-operator run`` for ``namespaces`` (not waiting for readiness).

    With ``webhook_configuration`` the operator serves its pod admission webhook on a free
    loopback port and manages a MutatingWebhookConfiguration of that name pointing at it (the
    API server runs on 127.0.0.1 too); without it, ``--no-webhook``.
    """
    metrics_port, health_port = free_port(), free_port()
    webhook_port = free_port() if webhook_configuration else None
    cmd = operator_command(
        region,
        namespaces,
        metrics_port=metrics_port,
        health_port=health_port,
        webhook_port=webhook_port,
        webhook_configuration=webhook_configuration,
        extra_args=extra_args,
    )
    op = Operator(
        cmd,
        operator_env(cluster, emulator, extra_env),
        log_path,
        list(namespaces),
        metrics_port,
        health_port,
        webhook_port,
        webhook_configuration,
    )
    return op.start()


# ---------------------------------------------------------------------------------------------
# kubectl


class Kubectl:
    """The cluster's own kubectl binary with the cluster's kubeconfig, nothing else."""

    def __init__(self, cluster: ClusterInfo, timeout: float = 60.0) -> None:
        self.binary = str(cluster.bin_dir / "kubectl")
        self.kubeconfig = str(cluster.kubeconfig)
        self.timeout = timeout

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float | None = None
    ) -> str:
        """Run ``kubectl ARGS``; stdout on success, StackError with stderr on failure."""
        cmd = [self.binary, "--kubeconfig", self.kubeconfig, *args]
        try:
            done = subprocess.run(
                cmd,
                input=stdin,
                capture_output=True,
                text=True,
                timeout=timeout or self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise StackError(
                f"kubectl {' '.join(args)}: no answer within {timeout or self.timeout:.0f}s"
            ) from None
        if check and done.returncode != 0:
            raise StackError(f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def apply(self, objects: Sequence[dict[str, Any]], *, namespace: str | None = None) -> list[str]:
        """Server-side apply (no last-applied annotation, so a large CRD fits); returns what changed."""
        args = ["apply", "--server-side", "--force-conflicts", "--field-manager=mmo-devtools", "-f", "-"]
        if namespace:
            args += ["--namespace", namespace]
        out = self.run(*args, stdin=yaml.safe_dump_all(list(objects), sort_keys=False))
        return [line.strip() for line in out.splitlines() if line.strip()]


def strip_product_finalizers(api: client.ApiClient, namespace: str) -> None:
    """Without a running operator nobody removes kopf's finalizer; a demo's leftovers must still go."""
    custom = client.CustomObjectsApi(api)
    try:
        items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    except ApiException as exc:
        if exc.status == 404:
            return
        raise
    for item in items:
        if item["metadata"].get("finalizers"):
            custom.patch_namespaced_custom_object(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                item["metadata"]["name"],
                {"metadata": {"finalizers": None}},
            )
