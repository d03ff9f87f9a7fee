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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from devtools.cluster import ClusterInfo
from kubernetes import client, watch
from prometheus_client.parser import text_string_to_metric_families

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
    OTHER_PRODUCT_CODE,
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


def gate_latency_count(op: OperatorProcess, namespace: str, product: str = "paid") -> float:
    """The gate latency histogram's count for one MeteredProduct (series keyed by namespace and name)."""
    for family in text_string_to_metric_families(op.metrics()):
        for sample in family.samples:
            if sample.name == "marketplace_metering_gate_latency_seconds_count" and sample.labels == {
                "namespace": namespace,
                "product": product,
                "product_code": PRODUCT_CODE,
            }:
                return float(sample.value)
    return 0.0


def gated_gauge(op: OperatorProcess, namespace: str, state: str, product: str = "paid") -> float:
    """``pods_gated`` for one MeteredProduct and state, as this operator process exports it."""
    for family in text_string_to_metric_families(op.metrics()):
        for sample in family.samples:
            if sample.name == "marketplace_metering_pods_gated" and sample.labels == {
                "namespace": namespace,
                "product": product,
                "product_code": PRODUCT_CODE,
                "state": state,
            }:
                return float(sample.value)
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
    assert gate_latency_count(op, namespace) == 3
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
    # Status is coalesced (one write per half second at most): wait for the write that counts both.
    status = wait_for(
        "status counting 2 denied pods",
        lambda: (
            (p := read_product(kube, namespace, "paid"))["status"].get("pods", {}).get("denied") == 2
            and condition(p, "Entitled").get("status") == "False"
            and p
        ),
    )
    assert condition(status, "Entitled")["reason"] == "CustomerNotEntitled"
    product_events = {e.reason for e in pod_events(kube, namespace, "paid")}
    assert "EntitlementDenied" in product_events
    calls_before = len(buyer_emulator.admin.events(operation="RegisterUsage"))
    assert calls_before == 2
    # Every pod denied: `kubectl get mprod` must not say READY True (readiness rule 5).
    ready = condition(buyer.condition("paid", "Ready", "False"), "Ready")
    assert ready["reason"] == "AllPodsDenied", ready

    # A crash and restart must not turn a denial into a running pod, nor ask AWS again.
    op.restart(kill=True).wait_ready()
    wait_condition(kube, namespace, "paid", "Ready", "False")
    # The new process's own gauge (it starts empty): it looked at both pods and decided Denied.
    wait_for(
        "the restarted operator to hold both pods as Denied",
        lambda: gated_gauge(op, namespace, "Denied") == 2,
    )
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
    # The condition above is the operator's decision: it registers nothing for an untrusted code.
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
    # The summary counts the pods proven after the restart too, not only the one granted since.
    wait_for(
        "deployment summary Granted 4/4",
        lambda: (
            (
                client.AppsV1Api(kube).read_namespaced_deployment("site", namespace).metadata.annotations
                or {}
            ).get(ANNOTATION_ENTITLEMENT)
            == "Granted 4/4"
        ),
    )


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


# --- The buyer as attacker: a namespace user bound to the built-in `edit` ClusterRole -------------------
#
# Until the admission policies are installed, the API server accepts some of these writes; what these
# tests prove is the operator's own defence: the pod ends up registered by the operator, not running, or
# evicted -- whatever the buyer wrote.


@pytest.fixture
def edit_user(cluster: ClusterInfo, kube: client.ApiClient, namespace: str) -> Iterator[client.ApiClient]:
    """A client acting as a ServiceAccount bound to ClusterRole `edit` in the namespace (not admin)."""
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": "buyer-dev"}})
    client.RbacAuthorizationV1Api(kube).create_namespaced_role_binding(
        namespace,
        {
            "metadata": {"name": "buyer-dev-edit"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"kind": "ServiceAccount", "name": "buyer-dev", "namespace": namespace}],
        },
    )
    token = core.create_namespaced_service_account_token(
        "buyer-dev", namespace, {"spec": {"audiences": [cluster.issuer], "expirationSeconds": 3600}}
    ).status.token
    configuration = client.Configuration()
    configuration.host = cluster.server
    configuration.ssl_ca_cert = str(cluster.ca_file)
    configuration.api_key = {"authorization": f"Bearer {token}"}
    api = client.ApiClient(configuration)
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:buyer-dev"
    assert "system:masters" not in (review.status.user_info.groups or [])

    def may(verb: str, resource: str, subresource: str | None = None) -> bool:
        attributes = client.V1ResourceAttributes(
            verb=verb, resource=resource, subresource=subresource, namespace=namespace
        )
        spec = client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        answer = client.AuthorizationV1Api(api).create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(spec=spec)
        )
        return bool(answer.status.allowed)

    wait_for("the edit binding to take effect", lambda: may("create", "pods"))
    assert may("patch", "pods")
    assert not may("patch", "meteredproducts", "status")
    try:
        yield api
    finally:
        api.close()


def apiserver_pod_patches(kube: client.ApiClient) -> float:
    """PATCHes of pods (not subresources) the API server has served: on this test cluster, only the
    operator patches pods (the scheduler binds, KWOK writes status)."""
    response = kube.call_api(
        "/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True
    )
    total = 0.0
    for family in text_string_to_metric_families(response.data.decode()):
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name == "apiserver_request_total"
                and labels.get("verb") == "PATCH"
                and labels.get("resource") == "pods"
                and not labels.get("subresource")
            ):
                total += sample.value
    return total


def read_pod(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(
        client.ApiClient().sanitize_for_serialization(
            client.CoreV1Api(kube).read_namespaced_pod(name, namespace)
        )
    )


def pod_gone(kube: client.ApiClient, namespace: str, name: str, uid: str) -> bool:
    try:
        current = read_pod(kube, namespace, name)
    except client.ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return current["metadata"]["uid"] != uid or bool(current["metadata"].get("deletionTimestamp"))


def event_reasons(kube: client.ApiClient, namespace: str, name: str) -> set[str]:
    return {e.reason for e in pod_events(kube, namespace, name)}


def forged_annotations(signature: str = "eyJhbGciOiJub25lIn0.eyJub25jZSI6IngifQ.") -> dict[str, str]:
    return {
        ANNOTATION_ENTITLEMENT: "Granted",
        ANNOTATION_SIGNATURE: signature,
        ANNOTATION_REGISTERED_AT: "2020-01-01T00:00:00Z",
        ANNOTATION_PRODUCT: "someone/else",
        REASON: "",
    }


def user_deployment(
    api: client.ApiClient, namespace: str, name: str, *, sa: str, replicas: int, notes: dict[str, str]
) -> None:
    client.AppsV1Api(api).create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}, "annotations": notes},
                    "spec": {
                        "serviceAccountName": sa,
                        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                    },
                },
            },
        },
    )


def user_pod(
    api: client.ApiClient, namespace: str, *, app: str, sa: str, notes: dict[str, str] | None = None
) -> dict[str, Any]:
    created = client.CoreV1Api(api).create_namespaced_pod(
        namespace,
        {
            "metadata": {
                "name": f"{app}-{uuid.uuid4().hex[:6]}",
                "labels": {"app": app},
                "annotations": notes or {},
            },
            "spec": {
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "registry.invalid/a:1"}],
            },
        },
    )
    return dict(client.ApiClient().sanitize_for_serialization(created))


def test_template_granted_annotation_is_registered_by_the_operator_not_trusted(
    buyer: Buyer, edit_user: client.ApiClient
) -> None:
    """Entitled buyer: the forged `Granted` template is gated anyway, each pod gets its own
    RegisterUsage (exactly one) and exactly one operator write, and its own verified signature."""
    kube, namespace = buyer.kube, buyer.namespace
    buyer.product()
    buyer.start()
    patches_before = apiserver_pod_patches(kube)
    user_deployment(edit_user, namespace, "paid", sa="buyer", replicas=3, notes=forged_annotations())

    granted = wait_for(
        "3 pods granted by the operator",
        lambda: (
            (ps := all_in_state(kube, namespace, "paid", 3, "Granted"))
            and all(not gated(p) and notes(p)[ANNOTATION_PRODUCT] == f"{namespace}/paid" for p in ps)
            and ps
        ),
    )
    for pod in granted:
        verify_signature(
            notes(pod)[ANNOTATION_SIGNATURE],
            buyer.key_pem,
            product_code=PRODUCT_CODE,
            public_key_version=1,
            nonce=pod["metadata"]["uid"],
        )
    regs = registrations_by_pod(buyer.emulator)
    assert sorted(regs) == sorted(p["metadata"]["uid"] for p in granted)
    assert [r["calls"] for r in regs.values()] == [1, 1, 1]
    assert len(buyer.emulator.admin.events(operation="RegisterUsage")) == 3
    # One guarded patch per pod removed the gate and wrote the proof; nothing else wrote a pod.
    assert apiserver_pod_patches(kube) - patches_before == 3


def test_template_granted_annotation_of_an_unentitled_buyer_never_runs(
    buyer: Buyer, edit_user: client.ApiClient
) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    buyer.product(sa="freeloader", role=UNENTITLED_ROLE)
    buyer.start()
    user_deployment(edit_user, namespace, "paid", sa="freeloader", replicas=2, notes=forged_annotations())

    denied = buyer.pods_in_state(2, "Denied")
    for pod in denied:
        assert gated(pod)
        assert pod["status"].get("phase") == "Pending"
        assert notes(pod)[REASON].startswith("CustomerNotEntitledException")
        assert "EntitlementDenied" in event_reasons(kube, namespace, pod["metadata"]["name"])
    wait_for(
        "status counting 2 denied pods, none registered",
        lambda: (
            (p := read_product(kube, namespace, "paid"))["status"].get("pods")
            == {"registered": 0, "pending": 0, "denied": 2}
            and condition(p, "Entitled").get("status") == "False"
        ),
    )


def test_signature_copied_from_another_pod_is_not_accepted(buyer: Buyer, edit_user: client.ApiClient) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    service_account(kube, namespace, "freeloader", UNENTITLED_ROLE)
    buyer.product()
    buyer.start()
    paying = buyer.pod()
    (granted,) = buyer.pods_in_state(1, "Granted")
    stolen = notes(granted)[ANNOTATION_SIGNATURE]

    copy = user_pod(edit_user, namespace, app="paid", sa="freeloader", notes=forged_annotations(stolen))
    assert gated(copy), "the gate is added whatever the pod's annotations say"
    name, uid = copy["metadata"]["name"], copy["metadata"]["uid"]
    pod = wait_for(
        "the copy to be denied",
        lambda: (
            (p := read_pod(kube, namespace, name)) and notes(p).get(ANNOTATION_ENTITLEMENT) == "Denied" and p
        ),
    )
    assert gated(pod)
    assert pod["status"].get("phase") == "Pending"
    assert notes(pod)[REASON].startswith("CustomerNotEntitledException")
    # The operator asked AWS for the copy itself (its own nonce): the stolen proof decided nothing.
    nonces = [e["requestParameters"]["Nonce"] for e in buyer.emulator.admin.events(operation="RegisterUsage")]
    assert sorted(nonces) == sorted([paying["metadata"]["uid"], uid])


def test_gate_removed_by_the_buyer_from_a_denied_pod_gets_it_evicted(
    buyer: Buyer, edit_user: client.ApiClient
) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    buyer.product(sa="freeloader", role=UNENTITLED_ROLE)
    buyer.start()
    created = user_pod(edit_user, namespace, app="paid", sa="freeloader")
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]
    (denied,) = buyer.pods_in_state(1, "Denied")
    assert gated(denied)

    # The buyer removes the gate (today's API server lets an `edit` user do that).
    client.CoreV1Api(edit_user).patch_namespaced_pod(
        name, namespace, [{"op": "replace", "path": "/spec/schedulingGates", "value": []}]
    )
    wait_for("the pod to be evicted", lambda: pod_gone(kube, namespace, name, uid))
    wait_for(
        "UngatedPodEvicted on the pod and the product",
        lambda: (
            "UngatedPodEvicted" in event_reasons(kube, namespace, name)
            and "UngatedPodEvicted" in event_reasons(kube, namespace, "paid")
        ),
    )
    # The denial was final: nobody asked AWS again.
    assert len(buyer.emulator.admin.events(operation="RegisterUsage")) == 1


def test_pod_created_before_the_product_and_denied_is_evicted(
    buyer: Buyer, edit_user: client.ApiClient
) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    service_account(kube, namespace, "freeloader", UNENTITLED_ROLE)
    early = user_pod(edit_user, namespace, app="paid", sa="freeloader")  # no product, no gate
    assert not gated(early)
    name, uid = early["metadata"]["name"], early["metadata"]["uid"]
    wait_for(
        "the early pod to run", lambda: read_pod(kube, namespace, name)["status"].get("phase") == "Running"
    )
    buyer.product()
    buyer.start(ready=None)

    wait_for("the early pod to be evicted", lambda: pod_gone(kube, namespace, name, uid))
    expected = {"NotGated", "EntitlementDenied", "UngatedPodEvicted"}
    try:
        wait_for(
            "the Events that explain it",
            lambda: (
                expected <= event_reasons(kube, namespace, name)
                and "UngatedPodEvicted" in event_reasons(kube, namespace, "paid")
            ),
        )
    except TimeoutError:
        seen = (event_reasons(kube, namespace, name), event_reasons(kube, namespace, "paid"))
        raise AssertionError(f"Events on the pod and the product: {seen}") from None


def test_report_mode_reports_an_ungated_denied_pod_and_leaves_it(
    buyer: Buyer, edit_user: client.ApiClient
) -> None:
    kube, namespace = buyer.kube, buyer.namespace
    service_account(kube, namespace, "freeloader", UNENTITLED_ROLE)
    early = user_pod(edit_user, namespace, app="paid", sa="freeloader")
    name = early["metadata"]["name"]
    buyer.product()
    buyer.start(ready=None, extra_args=["--ungated-pod-action", "Report"])

    wait_for(
        "the reports on the pod and the product",
        lambda: (
            "UngatedPodReported" in event_reasons(kube, namespace, name)
            and "UngatedPodReported" in event_reasons(kube, namespace, "paid")
        ),
    )
    pod = read_pod(kube, namespace, name)
    assert pod["metadata"]["uid"] == early["metadata"]["uid"]
    assert not pod["metadata"].get("deletionTimestamp")
    assert notes(pod)[ANNOTATION_ENTITLEMENT] == "Denied"


def test_cluster_scope_restore_of_a_forged_status_registers_again(
    buyer: Buyer, edit_user: client.ApiClient, tmp_path: Path
) -> None:
    kube, namespace, key_pem, emulator = buyer.kube, buyer.namespace, buyer.key_pem, buyer.emulator
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
    buyer.product()  # Pod scope: its grant gives a genuine signature for a pod's uid to forge with
    buyer.product("site", sa="plain", role=None, scope="Cluster")
    op = buyer.start(ready="site", extra_env=identity)
    paying = buyer.pod()
    (granted,) = buyer.pods_in_state(1, "Granted")
    wait_for(
        "the cluster registration",
        lambda: (
            read_product(kube, namespace, "site")["status"].get("registration", {}).get("state") == "Granted"
        ),
    )
    calls = len(emulator.admin.events(operation="RegisterUsage"))
    assert calls == 2
    op.stop()

    forged = {
        "state": "Granted",
        "nonce": paying["metadata"]["uid"],
        "signature": notes(granted)[ANNOTATION_SIGNATURE],
        "registeredAt": "2999-01-01T00:00:00Z",
        "attempts": 1,
    }
    patch = {"status": {"registration": forged}}
    custom_as_user = client.CustomObjectsApi(edit_user)
    with pytest.raises(client.ApiException) as refused:
        custom_as_user.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "site", patch)
    assert refused.value.status == 403  # an `edit` user cannot write status at all ...
    # ... someone who can (a namespace admin with status rights) forges it while the operator is down:
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "site", patch
    )
    assert (
        read_product(kube, namespace, "site")["status"]["registration"]["nonce"] == paying["metadata"]["uid"]
    )

    op.start().wait_ready()
    kube_system_uid = client.CoreV1Api(kube).read_namespace("kube-system").metadata.uid
    status = wait_for(
        "a fresh cluster registration",
        lambda: (
            (p := read_product(kube, namespace, "site"))["status"].get("registration", {}).get("nonce")
            == kube_system_uid
            and p
        ),
    )
    registration = status["status"]["registration"]
    verified = verify_signature(
        registration["signature"],
        key_pem,
        product_code=PRODUCT_CODE,
        public_key_version=1,
        nonce=kube_system_uid,
    )
    assert verified.issued_at is not None
    assert registration["registeredAt"] == verified.issued_at.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert len(emulator.admin.events(operation="RegisterUsage")) == calls + 1


def test_a_throttled_product_does_not_delay_another_products_pod(buyer: Buyer) -> None:
    """40 pods of one product throttled without end; another product's new pod is granted at once."""
    kube, namespace, emulator = buyer.kube, buyer.namespace, buyer.emulator
    emulator.admin.set_fault("RegisterUsage", throttle_rate=1.0, product_codes=(PRODUCT_CODE,))
    buyer.product("slow")
    other_key = emulator.admin.public_key_pem(OTHER_PRODUCT_CODE, 1)
    product(kube, namespace, "fast", other_key, app="fast", product_code=OTHER_PRODUCT_CODE)
    buyer.start(ready="slow")
    wait_product_ready(kube, namespace, "fast")
    buyer.deployment("slow", replicas=40, sa="buyer")
    wait_for(
        "40 throttled pods",
        lambda: (
            len(
                {
                    e["requestParameters"]["Nonce"]
                    for e in emulator.admin.events(
                        operation="RegisterUsage", error_code="ThrottlingException"
                    )
                }
            )
            >= 40
        ),
        timeout=120,
    )

    created = buyer.pod("fast")
    started = time.monotonic()
    (pod,) = buyer.pods_in_state(1, "Granted", app="fast", timeout=30)
    latency = time.monotonic() - started
    assert pod["metadata"]["uid"] == created["metadata"]["uid"]
    fast_calls = [
        e
        for e in emulator.admin.events(operation="RegisterUsage")
        if e["requestParameters"]["ProductCode"] == OTHER_PRODUCT_CODE
    ]
    assert [e["errorCode"] for e in fast_calls] == [None], "one call, answered at the first attempt"
    print(f"healthy pod of another product granted {latency:.2f}s after creation")
    assert latency < 10, f"the healthy pod waited {latency:.1f}s behind the throttled product"
    # The slow product was being throttled before and after: its retries went on the whole time.
    fast_at = fast_calls[0]["wallTime"]
    throttled = emulator.admin.events(operation="RegisterUsage", error_code="ThrottlingException")
    assert throttled[0]["wallTime"] < fast_at
    wait_for(
        "a throttled retry after the healthy grant",
        lambda: any(
            e["wallTime"] > fast_at
            for e in emulator.admin.events(operation="RegisterUsage", error_code="ThrottlingException")
        ),
        timeout=60,
    )
    assert not any(notes(p).get(ANNOTATION_ENTITLEMENT) == "Granted" for p in pods(kube, namespace, "slow"))
