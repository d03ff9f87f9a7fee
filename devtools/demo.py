"""The demo: the whole product, locally, as a story in numbered steps (README's first command).

``make demo`` (``python -m devtools.demo``) starts or reuses the local cluster, starts the AWS
emulator (a product with two dimensions, an entitled buyer account, IRSA roles trusting the
cluster's service-account issuer, a settable clock) and the operator as real processes, applies
the CRD, a namespace, the IRSA-annotated ServiceAccounts, the product's public key and the
committed sample MeteredProduct, then a 3-replica Deployment, and shows what happens: pods
created behind the scheduling gate, registered with RegisterUsage one by one under their own
IRSA identity, released and Running; the Deployment's summary annotation; a signature checked
with ``metering-operator verify``; a scale to 5; an hour of MeterUsage sent after the emulator's
clock passes the hour; ``kubectl get mprod``; and what AWS would bill.

Everything it starts it stops, on success, failure, Ctrl-C or SIGTERM: the operator and the
emulator, the demo namespace and webhook configuration, and the cluster if the demo started it
(``--keep-cluster`` keeps it). A step that does not finish within its timeout (``--step-timeout``)
ends the demo with exit code 1 and says which step and why; an interrupted demo exits 130; logs
stay under ``.local/demo/`` (``--work-dir``).

Reusable orchestration (emulator, operator, kubectl) lives in :mod:`devtools.stack`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

from devtools.cluster import DEFAULT_STATE_DIR, ClusterInfo, LocalCluster
from devtools.local_aws import operator_identity
from devtools.stack import (
    Emulator,
    Kubectl,
    Operator,
    StackError,
    cluster_emulator_config,
    start_emulator,
    start_operator,
    strip_product_finalizers,
    wait_until,
)
from metering_operator.domain.entitlement import ANNOTATION_REASON
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    GROUP,
    PLURAL,
    VERSION,
)
from metering_operator.domain.product import SCHEDULING_GATE as GATE
from metering_operator.metering.request import PERMISSION_CHECK_TOKEN_PREFIX

REPO_ROOT = Path(__file__).resolve().parent.parent
CRD_FILE = REPO_ROOT / "manifests" / "crd" / "meteredproducts.yaml"
SAMPLE_FILE = REPO_ROOT / "manifests" / "samples" / "meteredproduct.yaml"
DEFAULT_WORK_DIR = REPO_ROOT / ".local" / "demo"

IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"

#: The make-believe buyer: AWS's own documentation example account id.
BUYER_ACCOUNT = "111122223333"
#: Another documentation-style account id, not subscribed to the product (``--unentitled``).
UNENTITLED_ACCOUNT = "444455556666"
#: A Region name of AWS's form that no AWS Region has: only the emulator and the operator use it.
FALLBACK_REGION = "demo-local-1"
OPERATOR_SA = "metering-operator"
TEAM = "storefront"
CPU_REQUEST = "250m"
HOURLY_PRICE = 0.12
DIMENSION_PRICES = {"replicas": 0.05, "vcpu": 0.02}
#: The operator reads the emulator's clock every second (commands/run.py EmulatorClock).
CLOCK_FOLLOW_SECONDS = 2.5

T = TypeVar("T")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop the story, clean up, exit 130.

    A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on the way (a
    probe's retry, a client library) mistakes it for a transient failure.
    """


# ---------------------------------------------------------------------------------------------
# Output


class Story:
    """Numbered steps with short lines and timings, flushed at once (the demo is watched live)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.number = 0
        self.title = ""
        self.t0 = time.monotonic()
        self.step_t0 = self.t0

    def step(self, title: str) -> None:
        self.number += 1
        self.title = title
        self.step_t0 = time.monotonic()
        self._print(f"\n[{self.number:>2}/{self.total}] {title}")

    def say(self, line: str = "") -> None:
        self._print(f"        {line}" if line else "")

    def block(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            self._print(f"          {line}")

    def done(self, summary: str) -> None:
        now = time.monotonic()
        self._print(f"        ok: {summary}  ({now - self.step_t0:.1f}s, total {now - self.t0:.0f}s)")

    def since_step(self) -> float:
        return time.monotonic() - self.step_t0

    @staticmethod
    def _print(text: str) -> None:
        print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Watching the demo's pods


@dataclass
class PodSeen:
    """What the demo saw of one pod, with monotonic times of its transitions."""

    name: str
    uid: str
    created_at: float
    gates_at_creation: list[str]
    scheduling_gated_condition: bool = False
    released_at: float | None = None
    running_at: float | None = None
    entitlement: str | None = None
    reason: str | None = None
    signature: str | None = None
    phase: str | None = None
    deleted: bool = False


class PodWatcher:
    """A watch on the demo's pods from before the Deployment exists.

    Polling could miss a gate the operator removes within a few hundred milliseconds; a watch
    from a resourceVersion taken before any pod exists sees each pod's creation as it was
    admitted, gate included, so the story never depends on timing.
    """

    def __init__(self, api: client.ApiClient, namespace: str, selector: str) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.selector = selector
        self.pods: dict[str, PodSeen] = {}
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._watch = watch.Watch()
        listed = self.core.list_namespaced_pod(namespace, label_selector=selector)
        self._resource_version: str = listed.metadata.resource_version
        for pod in listed.items:
            self._observe(pod)
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for event in self._watch.stream(
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=self._resource_version,
                    timeout_seconds=30,
                ):
                    pod = event["object"]
                    self._resource_version = pod.metadata.resource_version
                    if event["type"] == "DELETED":
                        with self.lock:
                            if pod.metadata.uid in self.pods:
                                self.pods[pod.metadata.uid].deleted = True
                    else:
                        self._observe(pod)
                    if self._stop.is_set():
                        return
            except ApiException as exc:
                if exc.status == 410:  # history compacted: start again from a fresh list
                    listed = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
                    self._resource_version = listed.metadata.resource_version
                    for pod in listed.items:
                        self._observe(pod)
                    continue
                if not self._stop.is_set():
                    self.error = exc
                return
            except Exception as exc:  # reported by the waits, which then fail clearly
                if not self._stop.is_set():
                    self.error = exc
                return

    def _observe(self, pod: Any) -> None:
        now = time.monotonic()
        uid: str = pod.metadata.uid
        gates = [g.name for g in (pod.spec.scheduling_gates or [])]
        annotations: dict[str, str] = pod.metadata.annotations or {}
        with self.lock:
            seen = self.pods.get(uid)
            if seen is None:
                seen = PodSeen(pod.metadata.name, uid, now, gates)
                self.pods[uid] = seen
            for cond in pod.status.conditions or []:
                if cond.type == "PodScheduled" and cond.reason == "SchedulingGated":
                    seen.scheduling_gated_condition = True
            if GATE not in gates and seen.released_at is None:
                seen.released_at = now
            if pod.status.phase == "Running" and seen.running_at is None:
                seen.running_at = now
            seen.phase = pod.status.phase
            seen.entitlement = annotations.get(ANNOTATION_ENTITLEMENT)
            seen.reason = annotations.get(ANNOTATION_REASON)
            seen.signature = annotations.get(ANNOTATION_SIGNATURE)
            if pod.metadata.deletion_timestamp is not None:
                seen.deleted = True

    def current(self) -> list[PodSeen]:
        with self.lock:
            return sorted((p for p in self.pods.values() if not p.deleted), key=lambda p: p.created_at)

    def check(self) -> None:
        if self.error is not None:
            raise StackError(f"watching pods failed: {self.error}")

    def stop(self) -> None:
        self._stop.set()
        self._watch.stop()


# ---------------------------------------------------------------------------------------------
# The demo


@dataclass
class Options:
    namespace: str
    work_dir: Path
    cluster_state_dir: Path
    keep_cluster: bool
    region: str
    timeout: float
    unentitled: bool
    contract: bool = False


@dataclass
class Demo:
    opts: Options
    story: Story = field(default_factory=lambda: Story(14))
    local: LocalCluster | None = None
    cluster_acquired: bool = False
    cluster_started: bool = False
    info: ClusterInfo | None = None
    api: client.ApiClient | None = None
    kubectl: Kubectl | None = None
    emulator: Emulator | None = None
    operator: Operator | None = None
    watcher: PodWatcher | None = None
    namespace_created: bool = False
    sample: dict[str, Any] = field(default_factory=dict)
    hour0: datetime = field(default_factory=lambda: datetime.now(UTC))

    # -- small helpers ------------------------------------------------------------------------

    #: What step 3 applies besides the ServiceAccounts, and what step 5 applies (story-specific).
    key_title = "the product's public key"
    product_title = f"sample MeteredProduct ({SAMPLE_FILE.relative_to(REPO_ROOT)})"

    @property
    def ns(self) -> str:
        return self.opts.namespace

    @property
    def product_name(self) -> str:
        return str(self.sample["metadata"]["name"])

    @property
    def product_code(self) -> str:
        return str(self.sample["spec"]["productCode"])

    @property
    def key_version(self) -> int:
        return int(self.sample["spec"]["publicKeyVersion"])

    @property
    def app_labels(self) -> dict[str, str]:
        labels: dict[str, str] = dict(self.sample["spec"]["selector"]["matchLabels"])
        return labels

    @property
    def app(self) -> str:
        return self.product_name

    @property
    def buyer_account(self) -> str:
        return UNENTITLED_ACCOUNT if self.opts.unentitled else BUYER_ACCOUNT

    @property
    def buyer_role(self) -> str:
        return f"arn:aws:iam::{self.buyer_account}:role/{self.app}"

    @property
    def operator_role(self) -> str:
        return f"arn:aws:iam::{BUYER_ACCOUNT}:role/{OPERATOR_SA}"

    @property
    def webhook_configuration(self) -> str:
        return f"mmo-demo-{self.ns}"

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float | None = None) -> T:
        def alive() -> str | None:
            if self.watcher is not None:
                self.watcher.check()
            for part in (self.operator, self.emulator):
                dead = part.dead() if part is not None else None
                if dead:
                    return dead
            return None

        return wait_until(what, probe, timeout or self.opts.timeout, alive=alive)

    def product(self) -> dict[str, Any]:
        assert self.api is not None
        obj: dict[str, Any] = client.CustomObjectsApi(self.api).get_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, self.product_name
        )
        return obj

    def metering_status(self) -> dict[str, Any]:
        status: dict[str, Any] = (self.product().get("status") or {}).get("metering") or {}
        return status

    def k(self) -> Kubectl:
        assert self.kubectl is not None
        return self.kubectl

    # -- the story ----------------------------------------------------------------------------

    def run(self) -> None:
        self.sample = yaml.safe_load(SAMPLE_FILE.read_text())
        self.step_cluster()
        self.step_emulator()
        self.step_objects()
        self.step_operator()
        self.step_product()
        self.step_deployment()
        self.step_registered()
        self.step_workload_annotation()
        self.step_verify()
        self.step_half_hour()
        self.step_scale()
        self.step_hour_sent()
        self.step_kubectl_get()
        self.step_bill()
        self.finish(
            "`.venv/bin/python -m devtools.demo --unentitled` shows a buyer who is not subscribed;\n"
            "      `make demo-contract` a contract product whose pods share 3 License Manager seats."
        )

    def finish(self, next_hint: str) -> None:
        total = time.monotonic() - self.story.t0
        print(f"\nDemo complete in {total:.0f}s. Logs: {self.opts.work_dir}", flush=True)
        print(f"Next: {next_hint}", flush=True)

    def step_cluster(self) -> None:
        s = self.story
        s.step("Local Kubernetes cluster (real kube-apiserver, fake KWOK nodes)")
        self.local = LocalCluster(self.opts.cluster_state_dir, log=lambda m: s.say(f"cluster: {m}"))
        if self.opts.keep_cluster and not self.local.is_healthy(patience=5):
            # Started like `make cluster`: it outlives the demo and test sessions leave it alone.
            self.info = self.local.up()
            self.cluster_started = True
        else:
            self.info, self.cluster_started = self.local.acquire(os.getpid())
            self.cluster_acquired = True
        self.api = config.new_client_from_config(config_file=str(self.info.kubeconfig))
        self.kubectl = Kubectl(self.info)
        s.say(f"API server     {self.info.server}")
        s.say(f"SA issuer      {self.info.issuer} (JWKS {self.info.jwks_uri})")
        s.say(f"KUBECONFIG     {self.info.kubeconfig}")
        s.done(f"{'started' if self.cluster_started else 'reused'}, {len(self.info.nodes)} fake nodes")

    def step_emulator(self) -> None:
        s = self.story
        assert self.info is not None
        s.step("AWS emulator: Marketplace Metering Service + STS, on loopback")
        state = self.opts.work_dir / "emulator-state"
        shutil.rmtree(state, ignore_errors=True)  # a fresh AWS each run: nothing billed yet
        dims = [d["name"] for d in self.sample["spec"]["metering"]["dimensions"]]
        product = {
            "productCode": self.product_code,
            "publicKeyVersions": [self.key_version],
            "dimensions": [{"name": d, "price": DIMENSION_PRICES.get(d, 0.01)} for d in dims],
            "entitledAccounts": [BUYER_ACCOUNT],
            "hourlyPrice": HOURLY_PRICE,
        }
        issuer = self.info.issuer
        roles = [
            # IRSA trust policies: only this namespace's ServiceAccount may assume each role.
            {
                "arn": self.buyer_role,
                "trust": [{"issuer": issuer, "subjects": [f"system:serviceaccount:{self.ns}:{self.app}"]}],
                "allowedActions": ["aws-marketplace:RegisterUsage"],
            },
            {
                "arn": self.operator_role,
                "trust": [{"issuer": issuer, "subjects": [f"system:serviceaccount:{self.ns}:{OPERATOR_SA}"]}],
                "allowedActions": ["aws-marketplace:MeterUsage"],
            },
        ]
        cfg = cluster_emulator_config(self.info, region=self.opts.region, products=[product], roles=roles)
        self.emulator = start_emulator(cfg, state, self.opts.work_dir / "emulator.log")
        # A settable clock: start at a whole hour so "an hour passes" is a few seconds later.
        self.hour0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.emulator.admin.set_clock(self.hour0)
        s.say(f"listening      {self.emulator.url}  (region {self.opts.region})")
        s.say(f"product        {self.product_code}")
        s.say(
            f"               RegisterUsage ${HOURLY_PRICE}/pod-hour; MeterUsage dimensions {', '.join(dims)}"
        )
        s.say(f"buyer          account {BUYER_ACCOUNT} entitled")
        if self.opts.unentitled:
            s.say(f"               but the pods' role is in account {self.buyer_account} (--unentitled)")
        s.say(f"IRSA roles     {self.buyer_role} (the pods)")
        s.say(f"               {self.operator_role} (the operator)")
        s.say(f"               trusting {issuer} (JWKS fetched from the API server)")
        s.say(f"clock          set to {self.hour0:%Y-%m-%d %H:%M:%S}Z")
        s.say(f"log            {self.emulator.log_path}")
        s.done("emulator up")

    def step_objects(self) -> None:
        s = self.story
        assert self.emulator is not None
        s.step(f"Apply: CRD, namespace, IRSA ServiceAccounts, {self.key_title}")
        self.prepare_namespace()
        crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
        for version in crd["spec"]["versions"]:
            # The API server accepts only {type: object} for metadata; tolerate a generated file
            # that carries a description there (as tests/e2e/conftest.py does).
            meta = version.get("schema", {}).get("openAPIV3Schema", {}).get("properties", {}).get("metadata")
            if isinstance(meta, dict):
                meta.pop("description", None)
        for line in self.k().apply([crd]):
            s.say(line)
        self.k().run("wait", "--for=condition=Established", f"crd/{crd['metadata']['name']}", "--timeout=60s")
        self.k().apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": self.ns}}])
        self.namespace_created = True
        for line in self.k().apply(self.namespace_objects(), namespace=self.ns):
            s.say(line)
        self.describe_namespace_objects()
        s.done(f"namespace {self.ns} ready")

    def namespace_objects(self) -> list[dict[str, Any]]:
        """The IRSA-annotated ServiceAccounts and the product's public key."""
        assert self.emulator is not None
        pem = self.emulator.admin.public_key_pem(self.product_code, self.key_version)
        key_ref = self.sample["spec"]["publicKey"]["configMapKeyRef"]
        return self.identities_and_key(key_ref["name"], key_ref["key"], pem)

    def identities_and_key(self, configmap: str, key: str, pem: str) -> list[dict[str, Any]]:
        """The pods' and the operator's IRSA-annotated ServiceAccounts, and a ConfigMap holding
        ``pem`` (the story's public key) under ``key``."""
        return [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": self.app, "annotations": {IRSA_ANNOTATION: self.buyer_role}},
            },
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": OPERATOR_SA, "annotations": {IRSA_ANNOTATION: self.operator_role}},
            },
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": configmap}, "data": {key: pem}},
        ]

    def describe_namespace_objects(self) -> None:
        key_ref = self.sample["spec"]["publicKey"]["configMapKeyRef"]
        self.story.say(f"{IRSA_ANNOTATION}: {self.buyer_role}")
        self.story.say(
            f"public key {key_ref['name']}/{key_ref['key']}: "
            f"exported by the emulator (PS256, v{self.key_version})"
        )

    def prepare_namespace(self) -> None:
        """A namespace left by an interrupted run goes first (its product's finalizer with it)."""
        assert self.api is not None
        core = client.CoreV1Api(self.api)
        try:
            core.read_namespace(self.ns)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        self.story.say(f"namespace {self.ns} is left from an earlier run: waiting until it is gone")
        strip_product_finalizers(self.api, self.ns)
        try:
            core.delete_namespace(self.ns)
        except ApiException as exc:
            if exc.status != 404:
                raise

        def gone() -> bool:
            try:
                core.read_namespace(self.ns)
            except ApiException as exc:
                if exc.status == 404:
                    return True
                raise
            strip_product_finalizers(self.api, self.ns)
            return False

        self.wait(f"the old namespace {self.ns} to go", gone, max(self.opts.timeout, 90))

    def step_operator(self) -> None:
        s = self.story
        assert self.info is not None
        assert self.emulator is not None
        s.step("Start the operator (metering-operator run, a real process)")
        # The operator's own AWS identity, as on EKS: IRSA with its ServiceAccount's token
        # (README "Running the operator" does the same with `python -m devtools.local_aws`).
        identity = operator_identity(
            self.info,
            self.ns,
            OPERATOR_SA,
            self.operator_role,
            token_file=self.opts.work_dir / "operator-token",
            hours=2,
        )
        log_path = self.opts.work_dir / "operator.log"
        log_path.unlink(missing_ok=True)
        self.operator = start_operator(
            self.info,
            self.emulator,
            [self.ns],
            log_path,
            region=self.opts.region,
            webhook_configuration=self.webhook_configuration,
            extra_args=[
                "--trusted-product-code",
                self.product_code,
                "--sample-interval-seconds",
                "1",
                "--emulator-clock-url",
                self.emulator.url,
                "--operator-namespace",
                self.ns,
                "--operator-identity",
                "demo-operator",
                "--lease-name",
                "mmo-demo-metering",
                "--lease-duration-seconds",
                "5",
            ],
            extra_env={
                **identity,
                "AWS_ROLE_SESSION_NAME": "metering-operator",
            },
        )
        s.say(f"watching       namespace {self.ns}; trusted product code {self.product_code}")
        s.say(
            f"webhook        https://127.0.0.1:{self.operator.webhook_port} "
            f"(MutatingWebhookConfiguration {self.webhook_configuration})"
        )
        s.say(
            f"policies       {self.webhook_configuration}-* (ValidatingAdmissionPolicies and the gate's "
            "MutatingAdmissionPolicy, in force even while the operator is stopped)"
        )
        s.say(
            f"AWS            {self.emulator.url} via AWS_ENDPOINT_URL_STS / _MARKETPLACE_METERING / "
            "_LICENSE_MANAGER"
        )
        s.say(f"log            {self.operator.log_path}")
        self.operator.wait_ready(self.opts.timeout)
        s.done(f"operator ready (pid {self.operator.process.pid if self.operator.process else '?'})")

    def step_product(self) -> None:
        s = self.story
        s.step(f"Apply the {self.product_title}")
        for line in self.k().apply([self.sample], namespace=self.ns):
            s.say(line)
        self.describe_product()

        def ready() -> dict[str, Any] | None:
            for cond in (self.product().get("status") or {}).get("conditions") or []:
                if cond.get("type") == "Ready" and cond.get("status") == "True":
                    return dict(cond)
            return None

        cond = self.wait("the MeteredProduct to be Ready", ready)
        s.done(f"Ready=True ({cond.get('reason')})")

    def describe_product(self) -> None:
        spec = self.sample["spec"]
        self.story.say(f"entitlement    {spec['entitlement']['mode']}, scope {spec['entitlement']['scope']}")
        for d in spec["metering"]["dimensions"]:
            self.story.say(
                f"dimension      {d['name']}: {d['source']}, {d['aggregation']}, rounded {d['rounding']}"
            )

    def deployment(self, replicas: int) -> dict[str, Any]:
        labels = {**self.app_labels, "team": TEAM}
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": self.app, "labels": labels},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": self.app_labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": self.app,
                        "containers": [
                            {
                                "name": "app",
                                # Never pulled: KWOK's fake nodes run no containers.
                                "image": "registry.invalid/example-product:1.0",
                                "resources": {"requests": {"cpu": CPU_REQUEST}},
                            }
                        ],
                    },
                },
            },
        }

    def step_deployment(self) -> None:
        s = self.story
        assert self.api is not None
        s.step("Deployment with 3 replicas: its pods are created behind the scheduling gate")
        selector = ",".join(f"{k}={v}" for k, v in self.app_labels.items())
        self.watcher = PodWatcher(self.api, self.ns, selector)
        for line in self.k().apply([self.deployment(3)], namespace=self.ns):
            s.say(f"{line} (serviceAccount {self.app}, cpu {CPU_REQUEST})")
        watcher = self.watcher

        def created() -> list[PodSeen] | None:
            pods = watcher.current()
            return pods if len(pods) >= 3 else None

        try:
            pods = self.wait("3 pods to be created", created)
        except StackError as exc:
            logs = self.info.state_dir / "logs" if self.info else "the cluster's logs"
            raise StackError(
                f"{exc}; kube-controller-manager creates them (is it busy with other workloads? see {logs})"
            ) from None
        self.show_created(pods)
        s.done(f"{len(pods)} pods admitted with the gate added by the operator's webhook")

    def show_created(self, pods: list[PodSeen]) -> None:
        s = self.story
        for pod in pods:
            gates = ", ".join(pod.gates_at_creation) or "(none)"
            s.say(f"{pod.name:<34} created with schedulingGates: [{gates}]")
        ungated = [p.name for p in pods if GATE not in p.gates_at_creation]
        if ungated:
            raise StackError(f"pods created without the gate {GATE}: {', '.join(ungated)}")
        if any(p.scheduling_gated_condition for p in pods):
            s.say("PodScheduled=False, reason SchedulingGated: the scheduler leaves them alone")

    def wait_granted(self, count: int) -> list[PodSeen]:
        watcher = self.watcher
        assert watcher is not None

        def settled() -> list[PodSeen] | None:
            pods = watcher.current()
            denied = [p for p in pods if p.entitlement in ("Denied", "Error")]
            if denied:
                p = denied[0]
                raise DeniedError(
                    f"pod {p.name} is {p.entitlement}: {p.reason}\n"
                    "  (a denial is final: the pod stays behind the scheduling gate)"
                )
            done = [p for p in pods if p.entitlement == "Granted" and p.running_at is not None]
            return pods if len(pods) == count and len(done) == count else None

        try:
            return self.wait(f"{count} pods Granted and Running", settled)
        except DeniedError:
            raise
        except StackError:
            states = ", ".join(
                f"{p.name}: {p.entitlement or 'no annotation'}/{p.phase}" for p in watcher.current()
            )
            hint = ""
            if any(p.entitlement == "Granted" and p.running_at is None for p in watcher.current()):
                logs = self.info.state_dir / "logs" if self.info else "the cluster's logs"
                hint = f"; Granted pods not Running: is the scheduler or KWOK busy? see {logs}"
            raise StackError(
                f"timed out waiting for {count} pods Granted and Running ({states}){hint}"
            ) from None

    def show_registered(self, pods: list[PodSeen]) -> None:
        s = self.story
        assert self.emulator is not None
        regs = {r["identity"].get("podUid"): r for r in self.emulator.admin.registrations(self.product_code)}
        for pod in pods:
            reg = regs.get(pod.uid)
            if reg is None:
                raise StackError(f"the emulator has no RegisterUsage registration for pod {pod.name}")
            identity = reg["identity"]
            role = str(identity.get("roleArn") or identity.get("arn") or "?").rsplit("/", 1)[-1]
            if identity.get("podName") not in (None, pod.name):
                raise StackError(f"pod {pod.name} registered as pod {identity.get('podName')}")
            released = (pod.released_at or pod.created_at) - pod.created_at
            running = (pod.running_at or pod.created_at) - pod.created_at
            s.say(f"{pod.name:<34} STS: token bound to this pod -> role/{role}")
            s.say(
                f"{'':<34} RegisterUsage nonce={pod.uid[:8]}.. -> Granted: "
                f"ungated +{released:.2f}s, Running +{running:.2f}s"
            )

    def step_registered(self) -> None:
        s = self.story
        s.step("Each pod registers with RegisterUsage under its own IRSA identity, then runs")
        pods = self.wait_granted(3)
        self.show_registered(pods)
        s.done("3/3 pods Granted and Running")

    def workload_annotation(self, expected: str) -> str:
        def current() -> str | None:
            out = self.k().run(
                "get", "deployment", self.app, "-n", self.ns, "-o", "jsonpath={.metadata.annotations}"
            )
            notes: dict[str, str] = json.loads(out or "{}")
            value = notes.get(ANNOTATION_ENTITLEMENT)
            return value if value == expected else None

        return self.wait(f"the Deployment's annotation to say {expected!r}", current)

    def step_workload_annotation(self) -> None:
        s = self.story
        s.step("The Deployment carries the summary")
        value = self.workload_annotation("Granted 3/3")
        s.say(f"deployment/{self.app}  {ANNOTATION_ENTITLEMENT}: {value}")
        s.done("workload annotated")

    def step_verify(self) -> None:
        s = self.story
        assert self.watcher is not None
        assert self.api is not None
        s.step("Verify one pod's signature with `metering-operator verify`")
        pods = self.watcher.current()
        pod, other = pods[0], pods[1]
        if not pod.signature:
            raise StackError(f"pod {pod.name} has no {ANNOTATION_SIGNATURE} annotation")
        sig = self.opts.work_dir / "signature.jwt"
        sig.write_text(pod.signature + "\n")
        key_ref = self.sample["spec"]["publicKey"]["configMapKeyRef"]
        # The key as deployed (read back from the ConfigMap), not the emulator's copy.
        cm = client.CoreV1Api(self.api).read_namespaced_config_map(key_ref["name"], self.ns)
        pem_file = self.opts.work_dir / "public.pem"
        pem_file.write_text(cm.data[key_ref["key"]])
        s.say(f"signature of {pod.name} -> {sig} ({len(pod.signature)} chars, PS256 JWT)")
        for nonce, expect in ((pod.uid, 0), (other.uid, 1)):
            if expect:
                s.say(f"the same signature, claimed for another pod ({other.name}):")
            args = [
                "verify",
                f"@{sig}",
                "--product-code",
                self.product_code,
                "--public-key-version",
                str(self.key_version),
                "--nonce",
                nonce,
                "--public-key",
                str(pem_file),
            ]
            shown = [short_path(a) for a in args]
            s.say(f"$ metering-operator verify {shown[1]} \\")
            s.say(f"      {' '.join(shown[2:6])} \\")
            s.say(f"      {' '.join(shown[6:])}")
            done = subprocess.run(
                [*verify_command(), *args], capture_output=True, text=True, timeout=60, check=False
            )
            s.block((done.stdout + done.stderr).strip() + f"\n(exit code {done.returncode})")
            if done.returncode != expect:
                raise StackError(f"metering-operator verify exited {done.returncode}, expected {expect}")
        s.done("valid for its own pod, refused for any other (the nonce binds it)")

    def advance_clock(self, to: datetime) -> None:
        assert self.emulator is not None
        self.emulator.admin.set_clock(to)
        self.story.say(f"emulator clock -> {to:%H:%M:%S}Z")

    def wait_sampled(self, after: datetime, values: dict[str, str]) -> None:
        """Until the operator's open hour has samples taken at or after ``after`` with ``values``."""

        def seen() -> bool:
            open_hour = self.metering_status().get("openHour") or {}
            dims = {d.get("name"): d for d in open_hour.get("dimensions") or []}
            for name, value in values.items():
                d = dims.get(name)
                if not d or not d.get("lastSampleAt") or d.get("lastValue") is None:
                    return False
                when = datetime.fromisoformat(str(d["lastSampleAt"]).replace("Z", "+00:00"))
                if float(d["lastValue"]) != float(value):
                    return False
                if when < after:
                    # The value changed before the operator's clock reached ``after``: the hour's
                    # average would not be what the story says, so say so instead of waiting.
                    raise StackError(
                        f"the operator sampled {name}={value} at {when:%H:%M:%S}Z, before {after:%H:%M:%S}Z"
                    )
            return True

        self.wait(f"the operator to sample {values} after {after:%H:%M:%S}Z", seen)

    def step_half_hour(self) -> None:
        s = self.story
        s.step("Half an hour passes (emulator clock); the operator samples every second")
        dims = self.sample_dimension_names()
        values = {dims[0]: "3", dims[1]: str(3 * cpu_cores(CPU_REQUEST))}
        self.wait_sampled(self.hour0, values)
        s.say(f"open hour {self.hour0:%H:%M}Z: {dims[0]}=3, {dims[1]}={values[dims[1]]}")
        half = self.hour0 + timedelta(minutes=30)
        self.advance_clock(half)
        s.say("the operator follows that clock (--emulator-clock-url, read every second); unchanged")
        s.say("samples are not written to status: a gap counts as the last value (3 pods, 30 min)")
        # Nothing observable changes while the value stays the same, so give the operator's clock
        # (refreshed every second) time to move before the scale, which must count from 04:30.
        time.sleep(CLOCK_FOLLOW_SECONDS)
        s.done(f"operator clock at {half:%H:%M}Z, still 3 pods")

    def step_scale(self) -> None:
        s = self.story
        assert self.watcher is not None
        s.step("Scale to 5 replicas: the new pods are gated, registered and released too")
        before = {p.uid for p in self.watcher.current()}
        self.k().run("scale", f"deployment/{self.app}", "-n", self.ns, "--replicas=5")
        s.say(f"$ kubectl scale deployment/{self.app} --replicas=5")
        pods = self.wait_granted(5)
        new = [p for p in pods if p.uid not in before]
        self.show_created(new)
        self.show_registered(new)
        value = self.workload_annotation("Granted 5/5")
        s.say(f"deployment/{self.app}  {ANNOTATION_ENTITLEMENT}: {value}")
        s.done(f"{len(new)} new pods Granted, 5/5 Running")

    def sample_dimension_names(self) -> list[str]:
        return [str(d["name"]) for d in self.sample["spec"]["metering"]["dimensions"]]

    def step_hour_sent(self) -> None:
        s = self.story
        s.step("The hour closes: one MeterUsage per dimension, recorded in the status ledger")
        dims = self.sample_dimension_names()
        self.wait_sampled(
            self.hour0 + timedelta(minutes=30), {dims[0]: "5", dims[1]: str(5 * cpu_cores(CPU_REQUEST))}
        )
        s.say(f"{dims[0]}: 3 pods for 30 min, then 5 for 30 min; {dims[1]}: at most 5 x {CPU_REQUEST}")
        self.advance_clock(self.hour0 + timedelta(hours=1, seconds=30))

        def sent() -> list[dict[str, Any]] | None:
            ledger = self.metering_status().get("ledger") or []
            mine = [e for e in ledger if parse_time(e.get("hour")) == self.hour0]
            failed = [e for e in mine if e.get("state") in ("Rejected", "Expired")]
            if failed:
                raise StackError(
                    f"ledger entry {failed[0].get('dimension')} is {failed[0].get('state')}: "
                    f"{failed[0].get('lastError')}"
                )
            if {e.get("dimension") for e in mine if e.get("state") == "Sent"} >= set(dims):
                return mine
            return None

        entries = self.wait(f"ledger entries for {self.hour0:%H:%M}Z to be Sent", sent)
        for e in sorted(entries, key=lambda e: str(e.get("dimension"))):
            s.say(
                f"{self.hour0:%H:%M}Z  {e['dimension']:<9} quantity {e['quantity']:<8} {e['state']}  "
                f"record {e.get('meteringRecordId')}  attempts {e.get('attempts')}"
            )
            for a in e.get("allocations") or []:
                tags = ", ".join(f"{t['key']}={t['value']}" for t in a.get("tags") or [])
                s.say(f"{'':<17}allocation {a.get('quantity')} to {tags}")
        assert self.emulator is not None
        records = [
            r
            for r in self.emulator.admin.meter_records(self.product_code)
            if parse_time(r.get("hour")) == self.hour0
        ]
        ledger_ids = sorted(str(e.get("meteringRecordId")) for e in entries)
        aws_ids = sorted(str(r.get("meteringRecordId")) for r in records)
        if aws_ids != ledger_ids:
            raise StackError(f"the emulator holds records {aws_ids}, the ledger says {ledger_ids}")
        s.say(f"the emulator holds exactly these {len(records)} records for {self.hour0:%H:%M}Z")
        s.done("hour metered exactly once per dimension")

    def step_kubectl_get(self) -> None:
        s = self.story
        s.step("kubectl get mprod")
        s.say(f"$ kubectl get mprod -n {self.ns}")
        s.block(self.k().run("get", "mprod", "-n", self.ns))
        s.done("status visible to kubectl")

    def step_bill(self) -> None:
        s = self.story
        assert self.emulator is not None
        s.step("What AWS would bill (the emulator's admin API)")
        bill = self.emulator.admin.billing(self.product_code)
        names = {p.uid: p.name for p in (self.watcher.current() if self.watcher else [])}
        s.say(f"as of {bill.get('now')}")
        for p in bill.get("pods") or []:
            name = p.get("podName") or names.get(p.get("podUid"), p.get("podUid"))
            s.say(
                f"pod {name:<34} {float(p['billedSeconds']):>6.0f} s "
                f"x ${p['hourlyPrice']}/h = ${float(p['amount']):.4f}"
            )
        for d in bill.get("dimensions") or []:
            hour = parse_time(d.get("hour"))
            when = f"{hour:%H:%M}Z" if hour else d.get("hour")
            s.say(
                f"{d['dimension']:<9} {when}  quantity {d['quantity']:<8} "
                f"x ${d['unitPrice']} = ${float(d['amount']):.4f}"
            )
        total = float(bill.get("totalAmount") or 0)
        s.say(f"total ${total:.4f}")
        calls: dict[str, int] = {}
        for event in self.emulator.admin.events():
            token = str((event.get("requestParameters") or {}).get("ClientToken") or "")
            if event.get("eventName") == "MeterUsage" and token.startswith(PERMISSION_CHECK_TOKEN_PREFIX):
                key = "MeterUsage permission check"  # the DryRun at start: answered DryRunOperation
            else:
                error = f" ({event['errorCode']})" if event.get("errorCode") else ""
                key = str(event.get("eventName")) + error
            calls[key] = calls.get(key, 0) + 1
        s.say("AWS calls seen: " + ", ".join(f"{name} x{n}" for name, n in sorted(calls.items())))
        if not bill.get("pods") or not bill.get("dimensions"):
            raise StackError("the emulator would bill nothing: no pods or no dimension records")
        s.done(f"{len(bill['pods'])} pods, {len(bill['dimensions'])} dimension-hours")

    # -- cleanup ------------------------------------------------------------------------------

    def cleanup(self) -> None:
        print("\nCleaning up ...", flush=True)
        steps: list[tuple[str, Callable[[], None]]] = [
            ("stop watching pods", lambda: self.watcher.stop() if self.watcher else None),
            ("delete the MeteredProduct", self.delete_product),
            ("stop the operator", self.stop_operator),
            ("delete the webhook configuration", self.delete_webhook_configuration),
            ("delete the admission policies", self.delete_admission_policies),
            ("stop the emulator", self.stop_emulator),
            ("delete the namespace", self.delete_namespace),
            ("release the cluster", self.release_cluster),
        ]
        for what, action in steps:
            try:
                action()
            except Exception as exc:  # one failed cleanup step must not skip the others
                print(f"  cleanup: could not {what}: {exc}", flush=True)
        # The operator's web-identity token is a credential for the cluster: do not leave it lying around.
        (self.opts.work_dir / "operator-token").unlink(missing_ok=True)
        for path in (self.opts.work_dir / "emulator.log", self.opts.work_dir / "operator.log"):
            if path.exists():
                print(f"  log kept: {path}", flush=True)

    def delete_product(self) -> None:
        if self.api is None or not self.namespace_created:
            return
        custom = client.CustomObjectsApi(self.api)
        if self.operator is None or not self.operator.alive():
            strip_product_finalizers(self.api, self.ns)
        try:
            custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.product_name)
        except ApiException as exc:
            if exc.status == 404:
                return
            raise

        def gone() -> bool:
            try:
                custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, self.product_name)
            except ApiException as exc:
                if exc.status == 404:
                    return True
                raise
            return False

        try:
            wait_until("the MeteredProduct to go", gone, 15)
        except StackError:
            strip_product_finalizers(self.api, self.ns)  # the operator did not get to it
        print("  MeteredProduct deleted", flush=True)

    def stop_operator(self) -> None:
        if self.operator is not None and self.operator.process is not None:
            code = self.operator.stop()
            print(f"  operator stopped (exit {code})", flush=True)

    def delete_webhook_configuration(self) -> None:
        if self.api is None or self.operator is None:
            return
        try:
            client.AdmissionregistrationV1Api(self.api).delete_mutating_webhook_configuration(
                self.webhook_configuration
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        print(f"  MutatingWebhookConfiguration {self.webhook_configuration} deleted", flush=True)

    def delete_admission_policies(self) -> None:
        """Local mode left its admission policies in force after the operator stopped (by design)."""
        if self.api is None or self.operator is None:
            return
        from metering_operator.admission.install import delete

        # Named after the webhook configuration (the operator's default --admission-policy-prefix).
        removed = delete(self.api, self.webhook_configuration)
        print(f"  {len(removed)} admission policy objects deleted", flush=True)

    def stop_emulator(self) -> None:
        if self.emulator is not None:
            code = self.emulator.stop()
            print(f"  emulator stopped (exit {code})", flush=True)

    def delete_namespace(self) -> None:
        if self.api is None or not self.namespace_created:
            return
        core = client.CoreV1Api(self.api)
        try:
            core.delete_namespace(self.ns, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise
        print(f"  namespace {self.ns} deleted (finishing in the background)", flush=True)

    def release_cluster(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.local is None:
            return
        if self.cluster_acquired:
            stopped = self.local.release(os.getpid(), keep=self.opts.keep_cluster or not self.cluster_started)
            if stopped:
                print("  local cluster stopped (the demo had started it)", flush=True)
                return
        if self.info is not None:
            print(f"  local cluster left running: KUBECONFIG={self.info.kubeconfig}", flush=True)


class DeniedError(StackError):
    """A pod was denied: no waiting can change that (a denial is final)."""


def verify_command() -> list[str]:
    """The installed console script if there is one (what a user runs), else the module."""
    script = Path(sys.executable).parent / "metering-operator"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "metering_operator.cli"]


def short_path(arg: str) -> str:
    """A path argument relative to the working directory when it is below it (shorter lines)."""
    prefix = "@" if arg.startswith("@") else ""
    path = Path(arg[len(prefix) :])
    if path.is_absolute():
        try:
            return prefix + str(path.relative_to(Path.cwd()))
        except ValueError:
            return arg
    return arg


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def parse_time(value: Any) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


# ---------------------------------------------------------------------------------------------
# Command line


def _default_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or FALLBACK_REGION


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.demo", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--namespace", default="mmo-demo", help="namespace for the demo (default: mmo-demo)")
    parser.add_argument(
        "--keep-cluster", action="store_true", help="leave the local cluster running afterwards"
    )
    parser.add_argument(
        "--cluster-state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="the local cluster's state directory (default: .local/cluster, or MMO_CLUSTER_STATE_DIR)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="logs and emulator state (default: .local/demo)",
    )
    parser.add_argument(
        "--region",
        default=_default_region(),
        help=f"Region the emulator and operator agree on (default: AWS_REGION, AWS_DEFAULT_REGION or "
        f"{FALLBACK_REGION}, a name no AWS Region has)",
    )
    parser.add_argument(
        "--step-timeout", type=float, default=90.0, help="seconds each step may take (default: 90)"
    )
    parser.add_argument(
        "--unentitled",
        action="store_true",
        help="annotate the pods' ServiceAccount with a role of an account that is not entitled: "
        "the pods are Denied and stay gated, and the demo stops there with the reason",
    )
    parser.add_argument(
        "--contract",
        action="store_true",
        help="the second story: a contract product whose pods check out AWS License Manager seats "
        "(3 floating seats; a pod beyond them waits until a seat is checked in)",
    )
    args = parser.parse_args(argv)
    if args.contract and args.unentitled:
        parser.error("--unentitled belongs to the first story; it cannot be combined with --contract")
    return Options(
        namespace=args.namespace,
        work_dir=args.work_dir.resolve(),
        cluster_state_dir=args.cluster_state_dir,
        keep_cluster=args.keep_cluster,
        region=args.region,
        timeout=args.step_timeout,
        unentitled=args.unentitled,
        contract=args.contract,
    )


def _raise_interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    opts.work_dir.mkdir(parents=True, exist_ok=True)
    demo: Demo
    if opts.contract:
        from devtools.demo_contract import ContractDemo  # imports this module: loaded on demand

        demo = ContractDemo(opts)
    else:
        demo = Demo(opts)
    previous = {sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        demo.run()
    except Interrupted as exc:
        print(f"\nInterrupted ({exc}) during step {demo.story.number} ({demo.story.title}).", flush=True)
        code = 130
    except (StackError, ApiException, OSError, subprocess.SubprocessError) as exc:
        print(
            f"\nDEMO FAILED at step {demo.story.number}/{demo.story.total} ({demo.story.title}):\n  {exc}",
            flush=True,
        )
        code = 1
    finally:
        # Cleanup runs to the end: a second Ctrl-C would leave processes and objects behind.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)
        demo.cleanup()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


if __name__ == "__main__":
    sys.exit(main())
