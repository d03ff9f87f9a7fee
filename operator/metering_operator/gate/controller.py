"""The per-MeteredProduct control loop of the entitlement gate.

One :class:`ProductController` runs per MeteredProduct (a kopf daemon thread). It lists and
watches only the product's pods (namespace + the product's own selector, filtered by the API
server), decides per pod with :func:`metering_operator.domain.entitlement.decide`, and hands
registrations to a shared thread pool so a burst of pods is registered in parallel.

All of the controller's state is touched by its own thread only: the watch thread and the
workers talk to it through a queue. Pods that reached a final state (Granted, Denied) are
remembered by uid, so a late watch event carrying an older version of the pod can never trigger
a second registration.

Status (counts, ``Ready``/``Entitled`` conditions, ``observedGeneration``) is written with
server-side apply under the field manager :data:`FIELD_MANAGER`, and only when it differs from
what the object already says; other writers (the metering handlers) own their own conditions.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator import metrics
from metering_operator.aws import errors as aws_errors
from metering_operator.domain import entitlement as ent
from metering_operator.domain.clock import Clock
from metering_operator.domain.conditions import (
    ConditionSpec,
    condition_changed,
    get_condition,
    set_condition,
    status_patch,
)
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_REGISTERED_AT,
    ANNOTATION_SIGNATURE,
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SCHEDULING_GATE,
    VERSION,
    EntitlementMode,
    EntitlementScope,
    EntitlementState,
    MeteredProductSpec,
)
from metering_operator.domain.readiness import metering_rejects, ready_condition
from metering_operator.domain.selectors import to_query
from metering_operator.domain.signature import SignatureError, VerifiedSignature, load_public_key
from metering_operator.gate.registrar import ProductKey, Registrar, RegistrationSetupError
from metering_operator.kube.events import EventPoster
from metering_operator.kube.pods import PodApi, PodGone, WorkloadRef, object_ref
from metering_operator.kube.watch import WatchExpired, WatchStream

log = logging.getLogger(__name__)

FIELD_MANAGER = "metering-operator-entitlement"
WATCH_TIMEOUT_SECONDS = 60
#: Status and workload annotations are coalesced: a burst of 200 grants is a handful of writes.
FLUSH_INTERVAL_SECONDS = 0.5
#: Error outcomes (setup problems, bad signatures) are retried slowly; denials never.
ERROR_RETRY_BASE_SECONDS = 5.0
ERROR_RETRY_CAP_SECONDS = 300.0
#: Cluster scope: the operator's own registration is renewed this often.
CLUSTER_RENEW_SECONDS = 3600.0
TRANSIENT_BACKOFF_BASE = 0.2
TRANSIENT_BACKOFF_CAP = 10.0


@dataclass(frozen=True)
class ProductInfo:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: MeteredProductSpec
    trusted: bool
    public_key: RSAPublicKey | None
    key_error: str | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def mode(self) -> EntitlementMode:
        return self.spec.entitlement.mode

    @property
    def selector(self) -> str:
        return to_query(self.spec.selector)

    @property
    def active(self) -> bool:
        """Whether pods are handled at all (trusted, key usable, mode not Off)."""
        return self.trusted and self.public_key is not None and self.mode is not EntitlementMode.OFF

    def product_key(self) -> ProductKey:
        assert self.public_key is not None
        return ProductKey(self.spec.product_code, self.spec.public_key_version, self.public_key)

    def ref(self) -> dict[str, str]:
        return {
            "kind": KIND,
            "apiVersion": API_VERSION,
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
        }


@dataclass
class GateRuntime:
    """What every product controller shares: clients, the worker pool, settings."""

    api: client.ApiClient
    pods: PodApi
    events: EventPoster
    registrar: Registrar
    pool: ThreadPoolExecutor
    clock: Clock
    trusted_product_codes: frozenset[str]
    post_grant_events: bool = True
    _kube_system_uid: str | None = None

    def kube_system_uid(self) -> str:
        if self._kube_system_uid is None:
            ns = client.CoreV1Api(self.api).read_namespace("kube-system")
            self._kube_system_uid = str(ns.metadata.uid)
        return self._kube_system_uid


@dataclass
class _Result:
    uid: str
    outcome: ent.Outcome | None  # None: nothing happened (pod gone, stop requested)
    reason: str = ""
    workload: WorkloadRef | None = None
    ungated: bool = False


@dataclass
class _ClusterRegistration:
    state: EntitlementState
    nonce: str
    signature: VerifiedSignature | None = None
    token: str = ""
    registered_at: datetime | None = None
    attempts: int = 0
    last_error: str | None = None
    renew_at: float = 0.0


@dataclass
class _PodState:
    pod: dict[str, Any]
    workload: WorkloadRef | None = None


Message = tuple[str, Any]


class ProductController:
    def __init__(
        self,
        runtime: GateRuntime,
        namespace: str,
        name: str,
        body: Callable[[], Mapping[str, Any]],
    ) -> None:
        self.rt = runtime
        self.namespace = namespace
        self.name = name
        self._body = body
        self._queue: queue.Queue[Message] = queue.Queue()
        self._pods: dict[str, _PodState] = {}
        self._final: dict[str, EntitlementState] = {}
        self._inflight: set[str] = set()
        self._retry_at: dict[str, float] = {}
        self._error_attempts: dict[str, int] = {}
        self._ungated: set[str] = set()
        self._last_denial: str | None = None
        self._last_error: str | None = None
        self._dirty_status = True
        self._dirty_workloads: set[WorkloadRef] = set()
        self._last_flush = 0.0
        self._info: ProductInfo | None = None
        self._info_version: tuple[Any, ...] | None = None
        self._key_loaded_at = 0.0
        self._watch_token = 0
        self._watch_stop: threading.Event | None = None
        self._watch_stream: WatchStream | None = None
        self._stop = threading.Event()
        self._cluster: _ClusterRegistration | None = None
        self._cluster_inflight = False
        self._listed = False
        self._status_inflight = False
        self._last_applied: dict[str, Any] | None = None
        self._last_applied_at = 0.0
        self._last_conditions: dict[str, Mapping[str, Any]] = {}
        self._metering_verdict: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------------------------------
    # the loop

    def run(self, stopped: Any) -> None:
        """Run until ``stopped`` (kopf's DaemonStopped or a threading.Event) is set."""
        try:
            while not stopped.is_set():
                try:
                    self._refresh_product()
                    self._notice_metering()
                    self._drain(timeout=0.2)
                    self._retry_due()
                    self._ensure_cluster_registration()
                    self._flush()
                except Exception:
                    # One bad object or a transient API failure must not stop gating the product.
                    log.exception("entitlement loop of %s/%s failed; continuing", self.namespace, self.name)
                    stopped.wait(1.0)
        finally:
            self._stop.set()
            self._stop_watch()

    def _stop_watch(self) -> None:
        """End the pod watch now: its blocked read is cut short, so the thread exits at once."""
        if self._watch_stop is not None:
            self._watch_stop.set()
        if self._watch_stream is not None:
            self._watch_stream.close()

    def _drain(self, timeout: float, limit: int = 1000) -> None:
        try:
            message = self._queue.get(timeout=timeout)
        except queue.Empty:
            return
        # Bounded, so retries and status flushes still happen under a continuous stream of events.
        for _ in range(limit):
            self._handle(message)
            try:
                message = self._queue.get_nowait()
            except queue.Empty:
                return
        self._handle(message)

    def _handle(self, message: Message) -> None:
        kind, payload = message
        if kind == "list":
            token, items = payload
            if token != self._watch_token:
                return
            seen = {item["metadata"]["uid"] for item in items}
            for uid in list(self._pods):
                if uid not in seen:
                    self._forget(uid)
            for item in items:
                self._observe(item)
            self._listed = True
            self._dirty_status = True
        elif kind == "event":
            token, event_type, obj = payload
            if token != self._watch_token:
                return
            if event_type == "DELETED":
                self._forget(obj["metadata"]["uid"])
            else:
                self._observe(obj)
            self._dirty_status = True
        elif kind == "result":
            self._on_result(payload)
        elif kind == "cluster":
            self._on_cluster_result(payload)
        elif kind == "status":
            self._status_inflight = False
            if not payload:
                self._last_applied = None
                self._last_conditions = {}
                self._dirty_status = True

    # ------------------------------------------------------------------------------------------
    # product

    def _refresh_product(self) -> None:
        body = self._body()
        meta = body.get("metadata", {})
        now = time.monotonic()
        version = (meta.get("generation"), meta.get("uid"))
        key_stale = now - self._key_loaded_at > 60.0
        if version == self._info_version and not key_stale:
            return
        self._info_version = version
        self._key_loaded_at = now
        previous = self._info
        try:
            spec = MeteredProductSpec.model_validate(copy.deepcopy(dict(body.get("spec") or {})))
        except ValidationError as exc:
            log.error("MeteredProduct %s/%s has an invalid spec: %s", self.namespace, self.name, exc)
            self._info = None
            self._dirty_status = True
            return
        trusted = not self.rt.trusted_product_codes or spec.product_code in self.rt.trusted_product_codes
        public_key, key_error = self._load_key(spec)
        info = ProductInfo(
            namespace=self.namespace,
            name=self.name,
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            spec=spec,
            trusted=trusted,
            public_key=public_key,
            key_error=key_error,
        )
        self._info = info
        self._dirty_status = True
        if previous is None or previous.selector != info.selector or previous.generation != info.generation:
            if previous is not None and previous.generation != info.generation:
                # A changed spec (new key, mode, code) deserves a fresh look at errored pods.
                self._retry_at.clear()
                self._error_attempts.clear()
                self._cluster = None if previous.spec.product_code != spec.product_code else self._cluster
            self._restart_watch(info)
        elif previous.public_key is None and public_key is not None:
            self._reconcile_all()

    def _notice_metering(self) -> None:
        """Ready also judges the Metering condition (the metering side writes it): re-judge when
        its verdict changes. Only a rejecting Metering condition matters, so the hourly
        "reported through ..." message does not cause a status write here."""
        metering = get_condition((self._body().get("status") or {}).get("conditions"), "Metering")
        verdict = (
            (metering.get("reason"), metering.get("message"))
            if metering and metering_rejects(metering)
            else None
        )
        if verdict != self._metering_verdict:
            self._metering_verdict = verdict
            self._dirty_status = True

    def _load_key(self, spec: MeteredProductSpec) -> tuple[RSAPublicKey | None, str | None]:
        source = spec.public_key
        if source is None:
            return (
                None,
                "no publicKey in the spec" if spec.entitlement.mode is not EntitlementMode.OFF else None,
            )
        pem: str | None = source.pem
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            try:
                cm = client.CoreV1Api(self.rt.api).read_namespaced_config_map(ref.name, self.namespace)
            except ApiException as exc:
                return None, f"cannot read ConfigMap {self.namespace}/{ref.name}: {exc.status} {exc.reason}"
            pem = (cm.data or {}).get(ref.key)
            if not pem:
                return None, f"ConfigMap {self.namespace}/{ref.name} has no key {ref.key!r}"
        try:
            return load_public_key(pem or ""), None
        except SignatureError as exc:
            return None, str(exc)

    # ------------------------------------------------------------------------------------------
    # pod watch (its own thread; talks to the loop through the queue)

    def _restart_watch(self, info: ProductInfo) -> None:
        self._stop_watch()
        self._watch_token += 1
        self._listed = False
        stop = threading.Event()
        stream = WatchStream()
        self._watch_stop, self._watch_stream = stop, stream
        thread = threading.Thread(
            target=self._watch_loop,
            args=(info.selector, self._watch_token, stop, stream),
            name=f"watch-{self.namespace}-{self.name}",
            daemon=True,
        )
        thread.start()

    def _watch_loop(self, selector: str, token: int, stop: threading.Event, stream: WatchStream) -> None:
        while not stop.is_set():
            try:
                items, rv = self.rt.pods.list(self.namespace, selector)
                self._queue.put(("list", (token, items)))
                while not stop.is_set():
                    for event_type, obj in self.rt.pods.watch(
                        self.namespace, selector, rv, WATCH_TIMEOUT_SECONDS, stream
                    ):
                        rv = obj.get("metadata", {}).get("resourceVersion") or rv
                        if event_type == "BOOKMARK":
                            continue
                        if stop.is_set():
                            return
                        self._queue.put(("event", (token, event_type, obj)))
            except WatchExpired:
                continue
            except Exception:
                log.exception("pod watch for %s/%s failed; listing again", self.namespace, self.name)
                stop.wait(1.0)

    # ------------------------------------------------------------------------------------------
    # pods

    def _observe(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        state = self._pods.get(uid)
        if state is None:
            self._pods[uid] = _PodState(pod)
        else:
            state.pod = pod
        recorded = ent.entitlement_state(pod)
        if recorded in (EntitlementState.GRANTED, EntitlementState.DENIED):
            self._final.setdefault(uid, recorded)
        self._reconcile(uid)

    def _forget(self, uid: str) -> None:
        state = self._pods.pop(uid, None)
        self._final.pop(uid, None)
        self._retry_at.pop(uid, None)
        self._error_attempts.pop(uid, None)
        self._ungated.discard(uid)
        if state is not None and state.workload is not None:
            self._dirty_workloads.add(state.workload)

    def _reconcile_all(self) -> None:
        for uid in list(self._pods):
            self._reconcile(uid)

    def _reconcile(self, uid: str) -> None:
        info = self._info
        state = self._pods.get(uid)
        if info is None or state is None or not info.active:
            return
        if uid in self._inflight or self._retry_at.get(uid, 0.0) > time.monotonic():
            return
        pod = state.pod
        decision = ent.decide(pod, info.mode)
        final = self._final.get(uid)
        if decision.action is ent.Action.REGISTER and final is not None:
            # An older version of a pod we already finished: never register twice.
            return
        if decision.action is ent.Action.SKIP:
            return
        if decision.action is ent.Action.REGISTER and info.spec.entitlement.scope is EntitlementScope.CLUSTER:
            cluster = self._cluster
            if (
                cluster is None
                or cluster.state is EntitlementState.PENDING
                or cluster.state is EntitlementState.ERROR
            ):
                return  # released (or denied) when the cluster registration answers
        self._inflight.add(uid)
        if decision.ungated and uid not in self._ungated:
            self._ungated.add(uid)
        self.rt.pool.submit(self._work, pod, info, decision, self._cluster)

    def _retry_due(self) -> None:
        now = time.monotonic()
        due = [uid for uid, at in self._retry_at.items() if at <= now]
        for uid in due:
            del self._retry_at[uid]
            self._reconcile(uid)

    def _on_result(self, result: _Result) -> None:
        self._inflight.discard(result.uid)
        state = self._pods.get(result.uid)
        if result.workload is not None and state is not None:
            state.workload = result.workload
            self._dirty_workloads.add(result.workload)
        self._dirty_status = True
        outcome = result.outcome
        if outcome is ent.Outcome.GRANTED:
            self._final[result.uid] = EntitlementState.GRANTED
            self._error_attempts.pop(result.uid, None)
        elif outcome is ent.Outcome.DENIED:
            self._final[result.uid] = EntitlementState.DENIED
            self._last_denial = result.reason
        elif outcome is ent.Outcome.ERROR:
            attempts = self._error_attempts.get(result.uid, 0) + 1
            self._error_attempts[result.uid] = attempts
            delay = min(ERROR_RETRY_CAP_SECONDS, ERROR_RETRY_BASE_SECONDS * 2 ** (attempts - 1))
            self._retry_at[result.uid] = time.monotonic() + delay
            self._last_error = result.reason
        elif outcome is None and state is not None and not self._stop.is_set():
            # Nothing was decided (e.g. the pod changed under us): look again soon.
            self._retry_at[result.uid] = time.monotonic() + 1.0

    # ------------------------------------------------------------------------------------------
    # the work for one pod (worker thread)

    def _work(
        self,
        pod: dict[str, Any],
        info: ProductInfo,
        decision: ent.Decision,
        cluster: _ClusterRegistration | None,
    ) -> None:
        uid = pod["metadata"]["uid"]
        result = _Result(uid, None, ungated=decision.ungated)
        try:
            result = self._work_inner(pod, info, decision, cluster)
        except PodGone:
            result = _Result(uid, None)
        except Exception as exc:
            log.exception("entitlement of pod %s/%s failed", info.namespace, pod["metadata"].get("name"))
            result = _Result(uid, ent.Outcome.ERROR, f"InternalError: {exc}")
        finally:
            self._queue.put(("result", result))

    def _work_inner(
        self,
        pod: dict[str, Any],
        info: ProductInfo,
        decision: ent.Decision,
        cluster: _ClusterRegistration | None,
    ) -> _Result:
        meta = pod["metadata"]
        uid, name = meta["uid"], meta["name"]
        code = info.spec.product_code
        audit = info.mode is EntitlementMode.AUDIT
        # The owner is looked up after the decisive write where possible: it is a summary, and a
        # ReplicaSet GET must not sit between a pod and its gate removal.
        workload: WorkloadRef | None = None
        if decision.action is ent.Action.RELEASE:
            self.rt.pods.write_with_retry(pod, self._release_ops)
            return _Result(uid, None, workload=self._workload(pod))
        if decision.ungated:
            self.rt.events.post(
                object_ref(pod, "Pod", "v1"),
                "Warning",
                "NotGated",
                f"pod runs without the {SCHEDULING_GATE} gate (created while the webhook was "
                f"unreachable?); registering it for {info.key} now",
            )
        attempt = 0
        started = time.perf_counter()
        while True:
            attempt += 1
            try:
                if cluster is not None and info.spec.entitlement.scope is EntitlementScope.CLUSTER:
                    if cluster.state is EntitlementState.DENIED:
                        raise aws_errors.MeteringError(
                            (cluster.last_error or "Denied").split(":", 1)[0],
                            cluster.last_error or "cluster registration denied",
                            aws_errors.REGISTER_USAGE,
                            aws_errors.ErrorCategory.DENIED,
                        )
                    signature_token = cluster.token
                else:
                    verified = self.rt.registrar.register_pod(pod, info.product_key())
                    signature_token = verified_token(verified)
                break
            except aws_errors.MeteringError as exc:
                reason = f"{exc.code}: {exc.message}"
                if exc.operation == aws_errors.REGISTER_USAGE and exc.denied:
                    return self._finish_denied(pod, info, reason, audit)
                if exc.retryable and not self._stop.is_set():
                    metrics.REGISTRATIONS.labels(code, "retried").inc()
                    pod = self._write_state(pod, info, EntitlementState.PENDING, reason, audit)
                    delay = ent.backoff_delay(attempt, base=TRANSIENT_BACKOFF_BASE, cap=TRANSIENT_BACKOFF_CAP)
                    if self._stop.wait(delay):
                        return _Result(uid, None, workload=workload)
                    continue
                return self._finish_error(pod, info, reason, audit)
            except RegistrationSetupError as exc:
                return self._finish_error(pod, info, str(exc), audit)
            except SignatureError as exc:
                return self._finish_error(pod, info, f"InvalidSignature: {exc}", audit)
            except ApiException as exc:
                reason = f"KubernetesApi{exc.status}: {exc.reason}"
                if (exc.status in (429,) or (exc.status or 0) >= 500) and not self._stop.is_set():
                    pod = self._write_state(pod, info, EntitlementState.PENDING, reason, audit)
                    if self._stop.wait(ent.backoff_delay(attempt, base=0.5, cap=TRANSIENT_BACKOFF_CAP)):
                        return _Result(uid, None, workload=workload)
                    continue
                return self._finish_error(pod, info, reason, audit)

        registered_at = self.rt.clock.now()
        registered = time.perf_counter()

        def grant_ops(current: Mapping[str, Any]) -> list[dict[str, Any]] | None:
            if current.get("metadata", {}).get("uid") != uid:
                return None
            if ent.entitlement_state(current) in (EntitlementState.GRANTED, EntitlementState.DENIED):
                return None
            return ent.grant_patch(
                current, signature=signature_token, registered_at=registered_at, product_key=info.key
            )

        written = self.rt.pods.write_with_retry(pod, grant_ops)
        metrics.REGISTRATIONS.labels(code, "granted").inc()
        if written is not None:
            created = _parse_time(meta.get("creationTimestamp"))
            if created is not None and ent.is_gated(pod):
                metrics.GATE_LATENCY.labels(code).observe(max(0.0, (registered_at - created).total_seconds()))
            if self.rt.post_grant_events:
                self.rt.events.post(
                    object_ref(pod, "Pod", "v1"),
                    "Normal",
                    "Registered",
                    f"RegisterUsage granted for {info.key} ({code}); signature verified, gate removed",
                )
        log.info(
            "pod %s/%s granted for %s (registration %.0f ms, write %.0f ms, %d attempt(s))",
            info.namespace,
            name,
            info.key,
            1000 * (registered - started),
            1000 * (time.perf_counter() - registered),
            attempt,
        )
        return _Result(uid, ent.Outcome.GRANTED, workload=self._workload(pod), ungated=decision.ungated)

    def _finish_denied(self, pod: dict[str, Any], info: ProductInfo, reason: str, audit: bool) -> _Result:
        uid = pod["metadata"]["uid"]
        self._write_state(pod, info, EntitlementState.DENIED, reason, audit)
        metrics.REGISTRATIONS.labels(info.spec.product_code, "denied").inc()
        message = f"RegisterUsage denied for {info.key}: {reason}" + (
            " (audit mode: the pod is not held)" if audit else "; the pod stays gated (final)"
        )
        self.rt.events.post(object_ref(pod, "Pod", "v1"), "Warning", "EntitlementDenied", message)
        self.rt.events.post(
            info.ref(), "Warning", "EntitlementDenied", f"pod {pod['metadata']['name']}: {message}"
        )
        log.warning("pod %s/%s denied: %s", info.namespace, pod["metadata"]["name"], reason)
        return _Result(uid, ent.Outcome.DENIED, reason, self._workload(pod))

    def _finish_error(self, pod: dict[str, Any], info: ProductInfo, reason: str, audit: bool) -> _Result:
        uid = pod["metadata"]["uid"]
        self._write_state(pod, info, EntitlementState.ERROR, reason, audit)
        metrics.REGISTRATIONS.labels(info.spec.product_code, "error").inc()
        self.rt.events.post(
            object_ref(pod, "Pod", "v1"),
            "Warning",
            "EntitlementError",
            f"registration for {info.key} failed: {reason}"
            + ("" if audit else "; the pod stays gated and is retried later"),
        )
        log.warning("pod %s/%s registration error: %s", info.namespace, pod["metadata"]["name"], reason)
        return _Result(uid, ent.Outcome.ERROR, reason, self._workload(pod))

    def _write_state(
        self, pod: dict[str, Any], info: ProductInfo, state: EntitlementState, reason: str, release: bool
    ) -> dict[str, Any]:
        uid = pod["metadata"]["uid"]

        def ops(current: Mapping[str, Any]) -> list[dict[str, Any]] | None:
            if current.get("metadata", {}).get("uid") != uid:
                return None
            recorded = ent.entitlement_state(current)
            if recorded in (EntitlementState.GRANTED, EntitlementState.DENIED):
                return None
            if not ent.needs_state_write(current, state, reason) and not (release and ent.is_gated(current)):
                return None
            return ent.state_patch(current, state, reason, product_key=info.key, release=release)

        written = self.rt.pods.write_with_retry(pod, ops)
        # Later writes for this pod start from what we wrote, not from a stale version. The
        # caller's dict is shared with the controller thread, so it is replaced, never mutated.
        return written if written is not None else pod

    @staticmethod
    def _release_ops(current: Mapping[str, Any]) -> list[dict[str, Any]] | None:
        return ent.release_patch(current) if ent.is_gated(current) else None

    def _workload(self, pod: Mapping[str, Any]) -> WorkloadRef | None:
        try:
            return self.rt.pods.owner_workload(pod)
        except ApiException as exc:
            log.warning("cannot resolve the owner of pod %s: %s", pod["metadata"].get("name"), exc.reason)
            return None

    # ------------------------------------------------------------------------------------------
    # Cluster scope

    def _ensure_cluster_registration(self) -> None:
        info = self._info
        if info is None or not info.active or info.spec.entitlement.scope is not EntitlementScope.CLUSTER:
            return
        if self._cluster_inflight:
            return
        cluster = self._cluster
        if cluster is None:
            cluster = self._restore_cluster_registration(info)
            self._cluster = cluster
        if cluster is not None and cluster.state is EntitlementState.DENIED:
            return
        if (
            cluster is not None
            and cluster.state is EntitlementState.GRANTED
            and cluster.renew_at > time.monotonic()
        ):
            return
        if (
            cluster is not None
            and cluster.state is EntitlementState.ERROR
            and cluster.renew_at > time.monotonic()
        ):
            return
        self._cluster_inflight = True
        self.rt.pool.submit(self._cluster_work, info, cluster)

    def _restore_cluster_registration(self, info: ProductInfo) -> _ClusterRegistration | None:
        """Reuse a verified registration from status (a restart must not register again)."""
        registration = (self._body().get("status") or {}).get("registration") or {}
        token = registration.get("signature")
        nonce = registration.get("nonce")
        state = registration.get("state")
        if state == EntitlementState.DENIED.value:
            return _ClusterRegistration(
                EntitlementState.DENIED,
                nonce or "",
                last_error=registration.get("lastError"),
                attempts=int(registration.get("attempts") or 0),
            )
        if state != EntitlementState.GRANTED.value or not token or not nonce or info.public_key is None:
            return None
        try:
            from metering_operator.domain.signature import verify_signature

            verified = verify_signature(
                token,
                info.public_key,
                product_code=info.spec.product_code,
                public_key_version=info.spec.public_key_version,
                nonce=nonce,
            )
        except SignatureError:
            return None
        registered_at = _parse_time(registration.get("registeredAt"))
        age = (
            (self.rt.clock.now() - registered_at).total_seconds() if registered_at else CLUSTER_RENEW_SECONDS
        )
        return _ClusterRegistration(
            EntitlementState.GRANTED,
            nonce,
            verified,
            token,
            registered_at,
            attempts=int(registration.get("attempts") or 0),
            renew_at=time.monotonic() + max(0.0, CLUSTER_RENEW_SECONDS - age),
        )

    def _cluster_work(self, info: ProductInfo, previous: _ClusterRegistration | None) -> None:
        attempts = (previous.attempts if previous else 0) + 1
        nonce = ""
        try:
            nonce = self.rt.kube_system_uid()
            verified = self.rt.registrar.register_cluster(info.product_key(), nonce)
            result = _ClusterRegistration(
                EntitlementState.GRANTED,
                nonce,
                verified,
                verified_token(verified),
                self.rt.clock.now(),
                attempts,
                None,
                time.monotonic() + CLUSTER_RENEW_SECONDS,
            )
        except aws_errors.MeteringError as exc:
            reason = f"{exc.code}: {exc.message}"
            if exc.operation == aws_errors.REGISTER_USAGE and exc.denied:
                # Recorded in status with its nonce: a restarted operator must not ask again.
                result = _ClusterRegistration(
                    EntitlementState.DENIED, nonce, attempts=attempts, last_error=reason
                )
            else:
                keep = previous if previous and previous.state is EntitlementState.GRANTED else None
                delay = ent.backoff_delay(min(attempts, 8), base=1.0, cap=60.0)
                result = keep or _ClusterRegistration(
                    EntitlementState.PENDING if exc.retryable else EntitlementState.ERROR,
                    "",
                    attempts=attempts,
                    last_error=reason,
                )
                result.renew_at = time.monotonic() + delay
                result.last_error = reason
        except Exception as exc:
            log.exception("cluster registration for %s failed", info.key)
            result = _ClusterRegistration(
                EntitlementState.ERROR,
                "",
                attempts=attempts,
                last_error=str(exc),
                renew_at=time.monotonic() + 30.0,
            )
        self._queue.put(("cluster", result))

    def _on_cluster_result(self, result: _ClusterRegistration) -> None:
        self._cluster_inflight = False
        previous = self._cluster
        self._cluster = result
        self._dirty_status = True
        info = self._info
        if info is not None and (previous is None or previous.state is not result.state):
            kind: Literal["Normal", "Warning"] = (
                "Normal" if result.state is EntitlementState.GRANTED else "Warning"
            )
            self.rt.pool.submit(
                self.rt.events.post,
                info.ref(),
                kind,
                f"ClusterRegistration{result.state.value}",
                f"cluster-scope RegisterUsage: {result.state.value}"
                + (f" ({result.last_error})" if result.last_error else ""),
            )
        if result.state is EntitlementState.DENIED:
            self._last_denial = result.last_error
        if result.state in (EntitlementState.GRANTED, EntitlementState.DENIED):
            self._reconcile_all()

    # ------------------------------------------------------------------------------------------
    # status and workloads (coalesced)

    def _flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush < FLUSH_INTERVAL_SECONDS:
            return
        if not self._dirty_status and not self._dirty_workloads:
            return
        self._last_flush = now
        if self._dirty_workloads:
            workloads, self._dirty_workloads = self._dirty_workloads, set()
            for ref in workloads:
                self._write_workload(ref)
        if self._dirty_status and self._listed:
            self._dirty_status = False
            try:
                self._write_status()
            except ApiException as exc:
                log.warning(
                    "status of %s/%s not written: %s %s", self.namespace, self.name, exc.status, exc.reason
                )
                self._dirty_status = exc.status != 404

    def _states(self) -> list[EntitlementState | None]:
        result: list[EntitlementState | None] = []
        for uid, state in self._pods.items():
            if ent.is_terminating(state.pod):
                continue
            result.append(self._final.get(uid) or ent.entitlement_state(state.pod))
        return result

    def _write_workload(self, ref: WorkloadRef) -> None:
        members = [s for s in self._pods.values() if s.workload == ref and not ent.is_terminating(s.pod)]
        states = [self._final.get(s.pod["metadata"]["uid"]) or ent.entitlement_state(s.pod) for s in members]
        if not states:
            return
        latest_sig, latest_at = None, ""
        for s in members:
            notes = ent.pod_annotations(s.pod)
            at = notes.get(ANNOTATION_REGISTERED_AT, "")
            if notes.get(ANNOTATION_SIGNATURE) and at >= latest_at:
                latest_sig, latest_at = notes[ANNOTATION_SIGNATURE], at
        annotations = {ANNOTATION_ENTITLEMENT: ent.workload_summary(states)}
        if latest_sig:
            annotations[ANNOTATION_SIGNATURE] = latest_sig
            annotations[ANNOTATION_REGISTERED_AT] = latest_at
        self.rt.pool.submit(self._annotate_workload, ref, annotations)

    def _annotate_workload(self, ref: WorkloadRef, annotations: dict[str, str]) -> None:
        try:
            self.rt.pods.annotate_workload(ref, annotations)
        except ApiException as exc:
            log.warning("cannot annotate %s %s/%s: %s", ref.kind, ref.namespace, ref.name, exc.reason)

    def _write_status(self) -> None:
        info = self._info
        body = self._body()
        current = body.get("status") or {}
        generation = int(body.get("metadata", {}).get("generation") or 0)
        now = self.rt.clock.now()
        existing = current.get("conditions") or []
        if info is None:
            ready = ready_condition(spec_error="the spec does not parse; see the operator log")
            entitled = ConditionSpec("Entitled", "Unknown", "InvalidSpec", "the spec does not parse")
            counts = ent.PodCounts()
        else:
            ready = ready_condition(
                trusted=info.trusted,
                product_code=info.spec.product_code,
                key_error=info.key_error,
                meters=bool(info.spec.metering.dimensions),
                metering=get_condition(existing, "Metering"),
            )
            counts = ent.count_pods(self._states())
            ungated = sum(1 for uid in self._ungated if uid in self._pods)
            if not info.trusted:
                entitled = ConditionSpec("Entitled", "False", "UntrustedProductCode", ready.message)
            else:
                entitled = ent.entitled_condition(
                    info.mode,
                    counts,
                    last_denial=self._last_denial,
                    last_error=self._last_error if counts.pending else None,
                    ungated=ungated,
                )
            self._set_gauges(info)
        conditions = existing
        for spec in (ready, entitled):
            conditions = set_condition(
                conditions, spec.type, spec.status, spec.reason, spec.message, generation, now
            )
        mine = [c for c in conditions if c["type"] in ("Ready", "Entitled")]
        desired: dict[str, Any] = {
            "observedGeneration": generation,
            "pods": counts.to_status(),
            "conditions": conditions,
        }
        registration = self._registration_status()
        if registration is not None:
            desired["registration"] = registration
        if status_patch(current, desired) is None:
            return
        apply_body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "status": {"observedGeneration": generation, "pods": counts.to_status(), "conditions": mine},
        }
        if registration is not None:
            apply_body["status"]["registration"] = registration
        if apply_body == self._last_applied and time.monotonic() - self._last_applied_at < 10.0:
            return  # our previous write says exactly this; the cached body has not caught up yet
        if self._status_inflight:
            self._dirty_status = True
            return
        # Events for condition transitions, judged against what we last wrote (the cached body
        # may lag behind our own writes).
        events: list[tuple[Literal["Normal", "Warning"], str, str]] = []
        for spec in (ready, entitled):
            before = self._last_conditions.get(spec.type) or get_condition(existing, spec.type)
            after = get_condition(conditions, spec.type)
            if condition_changed(before, after):
                kind: Literal["Normal", "Warning"] = "Warning" if spec.status == "False" else "Normal"
                events.append((kind, f"{spec.type}{spec.reason}"[:128], spec.message))
        self._status_inflight = True
        self._last_applied = apply_body
        self._last_applied_at = time.monotonic()
        self._last_conditions = {c["type"]: c for c in mine}
        # The API call runs in the pool: the loop keeps dispatching pods meanwhile.
        self.rt.pool.submit(self._apply_status, apply_body, events, self._product_ref(body))

    def _apply_status(
        self,
        apply_body: dict[str, Any],
        events: list[tuple[Literal["Normal", "Warning"], str, str]],
        ref: dict[str, str],
    ) -> None:
        ok = True
        try:
            client.CustomObjectsApi(self.rt.api).patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                self.namespace,
                PLURAL,
                self.name,
                apply_body,
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
                _preload_content=False,
            )
        except ApiException as exc:
            ok = exc.status == 404  # the product is gone: nothing to retry
            log.warning(
                "status of %s/%s not written: %s %s", self.namespace, self.name, exc.status, exc.reason
            )
        except Exception:
            ok = False
            log.exception("status of %s/%s not written", self.namespace, self.name)
        else:
            for kind, reason, message in events:
                self.rt.events.post(ref, kind, reason, message)
        finally:
            self._queue.put(("status", ok))

    def _registration_status(self) -> dict[str, Any] | None:
        cluster = self._cluster
        if cluster is None:
            return None
        status: dict[str, Any] = {"state": cluster.state.value, "attempts": cluster.attempts}
        if cluster.nonce:
            status["nonce"] = cluster.nonce
        if cluster.token:
            status["signature"] = cluster.token
        if cluster.registered_at is not None:
            from metering_operator.domain.conditions import format_time

            status["registeredAt"] = format_time(cluster.registered_at)
        if cluster.last_error:
            status["lastError"] = cluster.last_error[:1024]
        return status

    def _product_ref(self, body: Mapping[str, Any]) -> dict[str, str]:
        return {
            "kind": KIND,
            "apiVersion": API_VERSION,
            "name": self.name,
            "namespace": self.namespace,
            "uid": str(body.get("metadata", {}).get("uid", "")),
        }

    def _set_gauges(self, info: ProductInfo) -> None:
        by_state: dict[str, int] = {"waiting": 0, "Pending": 0, "Denied": 0, "Error": 0}
        for uid, state in self._pods.items():
            if not ent.is_gated(state.pod) or self._final.get(uid) is EntitlementState.GRANTED:
                continue
            recorded = self._final.get(uid) or ent.entitlement_state(state.pod)
            by_state[recorded.value if recorded else "waiting"] = (
                by_state.get(recorded.value if recorded else "waiting", 0) + 1
            )
        for name, value in by_state.items():
            metrics.PODS_GATED.labels(info.spec.product_code, name).set(value)


def verified_token(verified: VerifiedSignature) -> str:
    return verified.token


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
