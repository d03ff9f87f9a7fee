"""The entitlement gate end to end: real operator process, real API server, emulator as AWS.

Every test drives the system the way a buyer's cluster would (ServiceAccounts with IRSA role
annotations, Deployments or Pods, a MeteredProduct) and judges the outcome from the API server
(pods, annotations, Events, status) and from the emulator (what AWS would have registered).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kubernetes import client, watch

from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_PRODUCT,
    ANNOTATION_REGISTERED_AT,
    ANNOTATION_SIGNATURE,
    GROUP,
    PLURAL,
    SCHEDULING_GATE,
    VERSION,
)
from metering_operator.domain.signature import SignatureError, verify_signature
from tests.e2e.conftest import (
    BUYER_ROLE,
    PRODUCT_CODE,
    UNENTITLED_ROLE,
    WAIT,
    OperatorFactory,
    OperatorProcess,
    wait_for,
)
from tests.emulator.harness import EmulatorProcess

pytestmark = pytest.mark.cluster

REASON = f"{GROUP}/reason"


# --- helpers -------------------------------------------------------------------------------------------


def service_account(kube: client.ApiClient, namespace: str, name: str, role_arn: str | None) -> None:
    annotations = {"eks.amazonaws.com/role-arn": role_arn} if role_arn else {}
    client.CoreV1Api(kube).create_namespaced_service_account(
        namespace, {"metadata": {"name": name, "annotations": annotations}}
    )


def product(
    kube: client.ApiClient,
    namespace: str,
    name: str,
    public_key_pem: str,
    *,
    app: str,
    mode: str = "Enforce",
    scope: str = "Pod",
    product_code: str = PRODUCT_CODE,
    dimensions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": name},
        "spec": {
            "productCode": product_code,
            "publicKeyVersion": 1,
            "publicKey": {"pem": public_key_pem},
            "selector": {"matchLabels": {"app": app}},
            "entitlement": {"mode": mode, "scope": scope},
        },
    }
    if dimensions:
        body["spec"]["metering"] = {"dimensions": dimensions}
    result: dict[str, Any] = client.CustomObjectsApi(kube).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, body
    )
    return result


def read_product(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return result


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def wait_condition(
    kube: client.ApiClient, namespace: str, name: str, type_: str, status: str
) -> dict[str, Any]:
    """The product as read once its ``type_`` condition has ``status``."""
    return dict(
        wait_for(
            f"MeteredProduct {name} {type_}={status}",
            lambda: (
                (p := read_product(kube, namespace, name))
                and condition(p, type_).get("status") == status
                and p
            ),
        )
    )


def wait_product_ready(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    """The product's controller is running (it wrote Ready), so the webhook knows the product too."""
    return wait_condition(kube, namespace, name, "Ready", "True")


def deployment(
    kube: client.ApiClient,
    namespace: str,
    name: str,
    *,
    app: str,
    replicas: int,
    sa: str,
    gate_in_template: bool = False,
) -> None:
    spec: dict[str, Any] = {
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
    }
    if gate_in_template:
        spec["schedulingGates"] = [{"name": SCHEDULING_GATE}]
    client.AppsV1Api(kube).create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": app}},
                "template": {"metadata": {"labels": {"app": app}}, "spec": spec},
            },
        },
    )


def bare_pod(kube: client.ApiClient, namespace: str, *, app: str, sa: str) -> dict[str, Any]:
    """Create a pod directly; the answer shows what admission did to it."""
    created = client.CoreV1Api(kube).create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": f"{app}-{uuid.uuid4().hex[:6]}", "labels": {"app": app}},
            "spec": {
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "registry.invalid/a:1"}],
            },
        },
    )
    return dict(client.ApiClient().sanitize_for_serialization(created))


def pods(kube: client.ApiClient, namespace: str, app: str) -> list[dict[str, Any]]:
    listed = client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=f"app={app}")
    return [dict(client.ApiClient().sanitize_for_serialization(p)) for p in listed.items]


def notes(pod: dict[str, Any]) -> dict[str, str]:
    return dict(pod["metadata"].get("annotations") or {})


def gated(pod: dict[str, Any]) -> bool:
    return any(g["name"] == SCHEDULING_GATE for g in pod["spec"].get("schedulingGates") or [])


def all_in_state(
    kube: client.ApiClient, namespace: str, app: str, n: int, state: str
) -> list[dict[str, Any]] | None:
    current = [p for p in pods(kube, namespace, app) if not p["metadata"].get("deletionTimestamp")]
    if len(current) == n and all(notes(p).get(ANNOTATION_ENTITLEMENT) == state for p in current):
        return current
    return None


class AnnotationRecorder:
    """Records every (entitlement, reason, gated) a watch shows for the selected pods."""

    def __init__(self, kube: client.ApiClient, namespace: str, selector: str) -> None:
        self.states: list[tuple[str, str, bool]] = []
        self._watch = watch.Watch()
        core = client.CoreV1Api(kube)

        def run() -> None:
            try:
                for event in self._watch.stream(core.list_namespaced_pod, namespace, label_selector=selector):
                    pod = event["object"]
                    notes_ = pod.metadata.annotations or {}
                    if ANNOTATION_ENTITLEMENT in notes_:
                        is_gated = any(g.name == SCHEDULING_GATE for g in pod.spec.scheduling_gates or [])
                        self.states.append((notes_[ANNOTATION_ENTITLEMENT], notes_.get(REASON, ""), is_gated))
            except Exception:  # stop() closes the stream under the reader; the states are what matter
                return

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._watch.stop()


def pod_events(kube: client.ApiClient, namespace: str, name: str) -> list[Any]:
    events = client.CoreV1Api(kube).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return list(events.items)


def registrations_by_pod(emulator: EmulatorProcess) -> dict[str, dict[str, Any]]:
    return {r["identity"].get("podUid"): r for r in emulator.admin.registrations(PRODUCT_CODE)}


def gate_latency_count(op: OperatorProcess) -> float:
    prefix = f'marketplace_metering_gate_latency_seconds_count{{product_code="{PRODUCT_CODE}"}}'
    for line in op.metrics().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def key_pem(buyer_emulator: EmulatorProcess) -> str:
    return buyer_emulator.admin.public_key_pem(PRODUCT_CODE, 1)


@dataclass
class Buyer:
    """A buyer's namespace with the operator and the emulator: what almost every test sets up."""

    kube: client.ApiClient
    namespace: str
    operator: OperatorFactory
    emulator: EmulatorProcess
    key_pem: str

    def product(
        self, name: str = "paid", *, sa: str = "buyer", role: str | None = BUYER_ROLE, **kw: Any
    ) -> None:
        """A ServiceAccount ``sa`` with IRSA ``role`` and a MeteredProduct (selecting ``app=name``)."""
        service_account(self.kube, self.namespace, sa, role)
        kw.setdefault("app", name)
        product(self.kube, self.namespace, name, kw.pop("key", self.key_pem), **kw)

    def start(self, ready: str | None = "paid", **kw: Any) -> OperatorProcess:
        """The operator; then, unless ``ready`` is None, until that product is Ready."""
        op = self.operator(self.namespace, self.emulator, **kw)
        if ready is not None:
            wait_product_ready(self.kube, self.namespace, ready)
        return op

    def condition(self, name: str, type_: str, status: str) -> dict[str, Any]:
        return wait_condition(self.kube, self.namespace, name, type_, status)

    def deployment(self, name: str = "paid", **kw: Any) -> None:
        kw.setdefault("app", name)
        deployment(self.kube, self.namespace, name, **kw)

    def pod(self, app: str = "paid", sa: str = "buyer") -> dict[str, Any]:
        return bare_pod(self.kube, self.namespace, app=app, sa=sa)

    def pods_in_state(
        self, n: int, state: str, app: str = "paid", timeout: float = WAIT
    ) -> list[dict[str, Any]]:
        return list(
            wait_for(
                f"{n} {state} pods", lambda: all_in_state(self.kube, self.namespace, app, n, state), timeout
            )
        )


@pytest.fixture
def buyer(
    kube: client.ApiClient,
    namespace: str,
    operator: OperatorFactory,
    buyer_emulator: EmulatorProcess,
    key_pem: str,
) -> Buyer:
    return Buyer(kube, namespace, operator, buyer_emulator, key_pem)


# --- Granted -------------------------------------------------------------------------------------------


def test_deployment_pods_are_gated_registered_verified_and_released(buyer: Buyer) -> None:
    kube, namespace, key_pem, buyer_emulator = buyer.kube, buyer.namespace, buyer.key_pem, buyer.emulator
    buyer.product()
    op = buyer.start()

    buyer.deployment(replicas=3, sa="buyer")
    granted = buyer.pods_in_state(3, "Granted")
    running = wait_for(
        "3 Running pods",
        lambda: (
            (ps := pods(kube, namespace, "paid"))
            and all(p["status"].get("phase") == "Running" for p in ps)
            and len(ps) == 3
            and ps
        ),
    )
    assert {p["metadata"]["uid"] for p in running} == {p["metadata"]["uid"] for p in granted}
    for pod in granted:
        uid = pod["metadata"]["uid"]
        assert not gated(pod)
        verified = verify_signature(
            notes(pod)[ANNOTATION_SIGNATURE],
            key_pem,
            product_code=PRODUCT_CODE,
            public_key_version=1,
            nonce=uid,
        )
        assert verified.nonce == uid
        assert notes(pod)[ANNOTATION_PRODUCT] == f"{namespace}/paid"
        assert notes(pod)[ANNOTATION_REGISTERED_AT].endswith("Z")
        # Another pod's signature must not pass for this one: the nonce binds it.
        others = [p for p in granted if p["metadata"]["uid"] != uid]
        with pytest.raises(SignatureError, match="nonce"):
            verify_signature(
                notes(others[0])[ANNOTATION_SIGNATURE],
                key_pem,
                product_code=PRODUCT_CODE,
                public_key_version=1,
                nonce=uid,
            )

    # Each pod was held by the gate (the latency histogram counts only gated pods) ...
    assert gate_latency_count(op) == 3
    # ... and AWS registered each pod once, under its own identity: 3 pods billed.
    billing = buyer_emulator.admin.billing(PRODUCT_CODE)
    assert sorted(p["podUid"] for p in billing["pods"]) == sorted(p["metadata"]["uid"] for p in granted)
    assert all(r["calls"] == 1 for r in registrations_by_pod(buyer_emulator).values())

    dep = client.AppsV1Api(kube).read_namespaced_deployment("paid", namespace)
    wait_for(
        "deployment summary",
        lambda: (
            (
                client.AppsV1Api(kube).read_namespaced_deployment("paid", namespace).metadata.annotations
                or {}
            ).get(ANNOTATION_ENTITLEMENT)
            == "Granted 3/3"
        ),
    )
    dep = client.AppsV1Api(kube).read_namespaced_deployment("paid", namespace)
    assert dep.metadata.annotations[ANNOTATION_SIGNATURE] in {notes(p)[ANNOTATION_SIGNATURE] for p in granted}

    status = wait_for(
        "status pods.registered == 3",
        lambda: (
            (p := read_product(kube, namespace, "paid"))["status"].get("pods", {}).get("registered") == 3
            and p
        ),
    )
    entitled = condition(status, "Entitled")
    assert (entitled["status"], entitled["reason"]) == ("True", "Registered")
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "Configured")
    assert condition(status, "Metering") == {}  # entitlement only: nothing else has a say
    assert status["status"]["observedGeneration"] == status["metadata"]["generation"]


# --- Denied --------------------------------------------------------------------------------------------


def test_unentitled_buyer_pods_stay_gated_and_denied_across_restart(buyer: Buyer) -> None:
    kube, namespace, buyer_emulator = buyer.kube, buyer.namespace, buyer.emulator
    buyer.product(sa="freeloader", role=UNENTITLED_ROLE)
    op = buyer.start()
    buyer.deployment(replicas=2, sa="freeloader")

    denied = buyer.pods_in_state(2, "Denied")
    for pod in denied:
        assert gated(pod)
        assert pod["status"].get("phase") == "Pending"
        assert notes(pod)[REASON].startswith("CustomerNotEntitledException")
        reasons = {e.reason for e in pod_events(kube, namespace, pod["metadata"]["name"])}
        assert "EntitlementDenied" in reasons
    status = buyer.condition("paid", "Entitled", "False")
    assert condition(status, "Entitled")["reason"] == "CustomerNotEntitled"
    assert status["status"]["pods"]["denied"] == 2
    product_events = {e.reason for e in pod_events(kube, namespace, "paid")}
    assert "EntitlementDenied" in product_events
    calls_before = len(buyer_emulator.admin.events(operation="RegisterUsage"))
    assert calls_before == 2

    # A crash and restart must not turn a denial into a running pod, nor ask AWS again.
    op.restart(kill=True).wait_ready()
    wait_product_ready(kube, namespace, "paid")
    time.sleep(5)
    after = pods(kube, namespace, "paid")
    assert len(after) == 2
    for pod in after:
        assert gated(pod)
        assert notes(pod)[ANNOTATION_ENTITLEMENT] == "Denied"
        assert pod["status"].get("phase") == "Pending"
    assert len(buyer_emulator.admin.events(operation="RegisterUsage")) == calls_before


# --- Throttling ----------------------------------------------------------------------------------------


def test_throttled_registrations_are_retried_until_granted_once_per_pod(buyer: Buyer) -> None:
    buyer_emulator = buyer.emulator
    buyer_emulator.admin.set_fault("RegisterUsage", throttle_rate=0.5)
    buyer.product()
    buyer.start()
    seen = AnnotationRecorder(buyer.kube, buyer.namespace, "app=paid")
    buyer.deployment(replicas=10, sa="buyer")

    granted = buyer.pods_in_state(10, "Granted", timeout=150)
    throttled = buyer_emulator.admin.events(operation="RegisterUsage", error_code="ThrottlingException")
    assert throttled, "the fault injection did not throttle anything: the test would prove nothing"
    regs = registrations_by_pod(buyer_emulator)
    assert sorted(regs) == sorted(p["metadata"]["uid"] for p in granted)
    assert [r["calls"] for r in regs.values()] == [1] * 10
    assert not any(gated(p) for p in granted)
    # While retrying, the pods said so: Pending, with the throttling as the reason, still gated.
    seen.stop()
    pending = [(state, reason, was_gated) for state, reason, was_gated in seen.states if state == "Pending"]
    assert pending, "no pod was ever seen Pending"
    assert all(reason.startswith("ThrottlingException") and was_gated for _, reason, was_gated in pending)


# --- Wrong key -----------------------------------------------------------------------------------------


def test_signature_that_does_not_verify_never_releases_a_pod(buyer: Buyer) -> None:
    kube, namespace, buyer_emulator = buyer.kube, buyer.namespace, buyer.emulator
    wrong = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    buyer.product(key=wrong)
    buyer.start()
    created = buyer.pod()
    assert gated(created)

    name = created["metadata"]["name"]
    pod = wait_for(
        "Error annotation",
        lambda: (
            (
                p := client.ApiClient().sanitize_for_serialization(
                    client.CoreV1Api(kube).read_namespaced_pod(name, namespace)
                )
            )
            and notes(p).get(ANNOTATION_ENTITLEMENT) == "Error"
            and p
        ),
    )
    assert gated(pod)
    assert notes(pod)[REASON].startswith("InvalidSignature")
    assert ANNOTATION_SIGNATURE not in notes(pod)
    # AWS did register the pod; the operator refused the proof anyway.
    assert len(registrations_by_pod(buyer_emulator)) == 1


# --- SIGKILL mid-burst ---------------------------------------------------------------------------------


def test_sigkill_in_the_middle_of_a_burst_loses_nothing_and_registers_at_most_twice(buyer: Buyer) -> None:
    buyer_emulator = buyer.emulator
    buyer.product()
    op = buyer.start()
    buyer.deployment(replicas=50, sa="buyer")

    wait_for(
        "some registrations",
        lambda: len(buyer_emulator.admin.registrations(PRODUCT_CODE)) >= 5,
        interval=0.05,
    )
    op.kill()
    partial = len(buyer_emulator.admin.registrations(PRODUCT_CODE))
    op.start().wait_ready()

    granted = buyer.pods_in_state(50, "Granted", timeout=180)
    assert not any(gated(p) for p in granted)
    regs = registrations_by_pod(buyer_emulator)
    assert sorted(regs) == sorted(p["metadata"]["uid"] for p in granted)
    assert max(r["calls"] for r in regs.values()) <= 2
    assert partial < 50, "the kill came after the burst: nothing was interrupted"


# --- Audit, Off, non-matching, webhook unreachable -----------------------------------------------------


def test_audit_mode_never_holds_a_pod_but_records_the_result(buyer: Buyer) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    service_account(kube, namespace, "freeloader", UNENTITLED_ROLE)
    buyer.product("audited", mode="Audit")
    buyer.start(ready="audited")
    denied_pod = buyer.pod("audited", sa="freeloader")
    granted_pod = buyer.pod("audited")
    assert not gated(denied_pod)
    assert not gated(granted_pod)

    def states() -> dict[str, str | None] | None:
        got = {
            p["metadata"]["name"]: notes(p).get(ANNOTATION_ENTITLEMENT)
            for p in pods(kube, namespace, "audited")
        }
        return got if None not in got.values() else None

    got = wait_for("both recorded", states)
    assert got == {denied_pod["metadata"]["name"]: "Denied", granted_pod["metadata"]["name"]: "Granted"}
    wait_for(
        "both running",
        lambda: all(p["status"].get("phase") == "Running" for p in pods(kube, namespace, "audited")),
    )


def test_off_mode_and_unselected_pods_are_left_alone(buyer: Buyer) -> None:
    kube, namespace, buyer_emulator = buyer.kube, buyer.namespace, buyer.emulator
    buyer.product()
    product(
        kube,
        namespace,
        "metered-only",
        buyer.key_pem,
        app="off",
        mode="Off",
        dimensions=[{"name": "replicas", "source": "Replicas"}],
    )
    buyer.start()
    off_pod = buyer.pod("off")
    other_pod = buyer.pod("unrelated")
    paid_pod = buyer.pod()
    assert not gated(off_pod)
    assert not gated(other_pod)
    assert gated(paid_pod)

    # The paid pod is processed; by then the others would have been too, had they been seen.
    buyer.pods_in_state(1, "Granted")
    wait_for(
        "others running",
        lambda: all(
            p["status"].get("phase") == "Running"
            for app in ("off", "unrelated")
            for p in pods(kube, namespace, app)
        ),
    )
    time.sleep(2)
    for app in ("off", "unrelated"):
        (pod,) = pods(kube, namespace, app)
        assert not any(k.startswith(GROUP) for k in notes(pod)), notes(pod)
    assert list(registrations_by_pod(buyer_emulator)) == [paid_pod["metadata"]["uid"]]


def test_pod_created_while_the_webhook_was_down_is_found_registered_and_reported(buyer: Buyer) -> None:
    buyer.product()
    early = buyer.pod()  # no operator, no webhook yet
    assert not gated(early)
    buyer.start(ready=None)

    (pod,) = buyer.pods_in_state(1, "Granted")
    assert pod["metadata"]["uid"] == early["metadata"]["uid"]
    reasons = {e.reason for e in pod_events(buyer.kube, buyer.namespace, early["metadata"]["name"])}
    assert "NotGated" in reasons
    status = buyer.condition("paid", "Entitled", "True")
    assert "1 pod(s) started without the entitlement gate" in condition(status, "Entitled")["message"]


def test_gate_written_in_the_template_works_without_the_webhook(buyer: Buyer) -> None:
    buyer.product()
    buyer.start(ready=None, webhook=False)
    buyer.deployment(replicas=2, sa="buyer", gate_in_template=True)
    granted = buyer.pods_in_state(2, "Granted")
    assert not any(gated(p) for p in granted)


def test_untrusted_product_code_is_refused_with_a_condition(buyer: Buyer) -> None:
    buyer.product("free-swap", app="paid")
    buyer.start(ready=None, extra_args=["--trusted-product-code", "someotherpaidproduct"])
    status = buyer.condition("free-swap", "Ready", "False")
    assert condition(status, "Ready")["reason"] == "UntrustedProductCode"
    created = buyer.pod()
    assert not gated(created)
    time.sleep(2)
    assert buyer.emulator.admin.registrations(PRODUCT_CODE) == []


def test_missing_irsa_role_is_an_error_not_a_grant(buyer: Buyer) -> None:
    buyer.product(sa="plain", role=None)
    buyer.start()
    created = buyer.pod(sa="plain")
    (pod,) = buyer.pods_in_state(1, "Error")
    assert pod["metadata"]["uid"] == created["metadata"]["uid"]
    assert gated(pod)
    assert notes(pod)[REASON].startswith("MissingRoleArn")


# --- Cluster scope ---------------------------------------------------------------------------------------


def test_cluster_scope_registers_once_as_the_operator_and_releases_every_pod(
    buyer: Buyer, tmp_path: Path
) -> None:
    kube, namespace, key_pem, buyer_emulator = buyer.kube, buyer.namespace, buyer.key_pem, buyer.emulator
    # The operator's own IRSA identity, as EKS would project it: a token for its service account.
    service_account(kube, namespace, "operator", BUYER_ROLE)
    token = (
        client.CoreV1Api(kube)
        .create_namespaced_service_account_token(
            "operator", namespace, {"spec": {"audiences": ["sts.amazonaws.com"], "expirationSeconds": 3600}}
        )
        .status.token
    )
    token_file = tmp_path / "operator-token"
    token_file.write_text(token + "\n")
    identity = {"AWS_ROLE_ARN": BUYER_ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file)}
    buyer.product("site", sa="plain", role=None, scope="Cluster")  # pods need no IRSA role here
    op = buyer.start(ready=None, extra_env=identity)
    buyer.deployment("site", replicas=3, sa="plain")

    granted = buyer.pods_in_state(3, "Granted", app="site")
    kube_system_uid = client.CoreV1Api(kube).read_namespace("kube-system").metadata.uid
    signatures = {notes(p)[ANNOTATION_SIGNATURE] for p in granted}
    assert len(signatures) == 1
    verify_signature(
        signatures.pop(), key_pem, product_code=PRODUCT_CODE, public_key_version=1, nonce=kube_system_uid
    )
    assert len(buyer_emulator.admin.events(operation="RegisterUsage")) == 1
    status = wait_for(
        "status.registration",
        lambda: (
            (p := read_product(kube, namespace, "site"))["status"].get("registration", {}).get("state")
            == "Granted"
            and p
        ),
    )
    assert status["status"]["registration"]["nonce"] == kube_system_uid

    # A restart reuses the verified registration from status: no second call, new pods released.
    op.restart(kill=True).wait_ready()
    client.AppsV1Api(kube).patch_namespaced_deployment_scale("site", namespace, {"spec": {"replicas": 4}})
    buyer.pods_in_state(4, "Granted", app="site")
    assert len(buyer_emulator.admin.events(operation="RegisterUsage")) == 1


# --- Operations ----------------------------------------------------------------------------------------


def test_json_logs_are_one_object_per_line(buyer: Buyer) -> None:
    """`--log-format json`: every line the operator writes parses as a JSON object with a message."""
    buyer.product()
    op = buyer.start(extra_args=["--log-format", "json"])
    buyer.pod()
    buyer.pods_in_state(1, "Granted")
    # The fixture's own "===== start <command>" separator lines are not the operator's output.
    lines = [line for line in op.log().splitlines() if line.strip() and not line.startswith("===== start")]
    assert lines, "the operator logged nothing"
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"not a JSON log line: {line!r}")
    assert all(isinstance(r, dict) and "message" in r for r in records)
    assert any("paid" in json.dumps(r) for r in records), "no record mentions the product"


def test_local_webhook_configuration_is_removed_on_graceful_shutdown(buyer: Buyer) -> None:
    """In local mode the operator owns its MutatingWebhookConfiguration; SIGTERM removes it."""
    buyer.product()
    op = buyer.start()
    assert op.webhook_configuration
    admission = client.AdmissionregistrationV1Api(buyer.kube)
    assert admission.read_mutating_webhook_configuration(op.webhook_configuration).webhooks
    op.stop()
    assert op.process.returncode == 0, op.log()[-3000:]
    with pytest.raises(client.ApiException) as err:
        admission.read_mutating_webhook_configuration(op.webhook_configuration)
    assert err.value.status == 404
