"""The per-MeteredProduct control loop of the entitlement gate.

One :class:`ProductController` runs per MeteredProduct (a kopf daemon thread). It lists and
watches only the product's pods (namespace + the product's own selector, filtered by the API
server), decides per pod with :func:`metering_operator.domain.entitlement.decide`, and hands
registrations to a shared thread pool so a burst of pods is registered in parallel (the work
for one pod: :mod:`metering_operator.gate.podwork`; scope Cluster's one registration:
:mod:`metering_operator.gate.cluster`).

All of the controller's state is touched by its own thread only: the watch thread and the
workers talk to it through a queue. Pods that reached a final state (Granted, Denied) are
remembered by uid, so a late watch event carrying an older version of the pod can never trigger
a second registration.

Status (counts, ``Ready``/``Entitled`` conditions, ``observedGeneration``) is written by
:mod:`metering_operator.gate.status` with server-side apply, and only when it differs from what
the object already says. This is the only writer of ``Ready``
(:func:`metering_operator.domain.readiness.ready_condition`), which also judges the
``Metering`` condition the metering handlers own and write; the controller re-judges Ready
when that condition's verdict changes on the (live) object. The product's watch ends the
moment the controller stops (deletion), not at the watch's server-side timeout.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator import metrics
from metering_operator.domain import entitlement as ent
from metering_operator.domain.conditions import (
    get_condition,
)
from metering_operator.domain.product import (
    EntitlementMode,
    EntitlementScope,
    EntitlementState,
    MeteredProductSpec,
)
from metering_operator.domain.readiness import metering_rejects
from metering_operator.domain.signature import SignatureError, load_public_key
from metering_operator.gate import cluster as cluster_scope
from metering_operator.gate.cluster import ClusterRegistration
from metering_operator.gate.podwork import PodRegistration, PodResult
from metering_operator.gate.runtime import GateRuntime, ProductInfo
from metering_operator.gate.status import GateView, StatusWrite, StatusWriter
from metering_operator.kube.pods import WorkloadRef
from metering_operator.kube.watch import WatchExpired, WatchStream

log = logging.getLogger(__name__)

WATCH_TIMEOUT_SECONDS = 60
#: Status and workload annotations are coalesced: a burst of 200 grants is a handful of writes.
FLUSH_INTERVAL_SECONDS = 0.5
#: Error outcomes (setup problems, bad signatures) are retried slowly; denials never.
ERROR_RETRY_BASE_SECONDS = 5.0
ERROR_RETRY_CAP_SECONDS = 300.0


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
        self._registration = PodRegistration(runtime, self._stop)
        self._cluster: ClusterRegistration | None = None
        self._cluster_inflight = False
        self._listed = False
        self._status = StatusWriter(runtime, namespace, name)
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
            self._status.inflight = False
            if not payload:
                self._status.forget()
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

    def _on_result(self, result: PodResult) -> None:
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
        cluster: ClusterRegistration | None,
    ) -> None:
        self._queue.put(("result", self._registration.run(pod, info, decision, cluster)))

    # ------------------------------------------------------------------------------------------
    # Cluster scope

    def _ensure_cluster_registration(self) -> None:
        info = self._info
        if info is None or not info.active or info.spec.entitlement.scope is not EntitlementScope.CLUSTER:
            return
        if self._cluster_inflight:
            return
        if self._cluster is None:
            status = self._body().get("status") or {}
            self._cluster = cluster_scope.restore(status.get("registration") or {}, info, self.rt.clock)
        cluster = self._cluster
        if cluster is not None and not cluster.due():
            return
        self._cluster_inflight = True
        self.rt.pool.submit(self._cluster_work, info, cluster)

    def _cluster_work(self, info: ProductInfo, previous: ClusterRegistration | None) -> None:
        self._queue.put(("cluster", cluster_scope.register(self.rt, info, previous)))

    def _on_cluster_result(self, result: ClusterRegistration) -> None:
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
        members = [
            (s.pod, self._final.get(s.pod["metadata"]["uid"]) or ent.entitlement_state(s.pod))
            for s in self._pods.values()
            if s.workload == ref and not ent.is_terminating(s.pod)
        ]
        if members:
            self.rt.pool.submit(self._annotate_workload, ref, ent.workload_annotations(members))

    def _annotate_workload(self, ref: WorkloadRef, annotations: dict[str, str]) -> None:
        try:
            self.rt.pods.annotate_workload(ref, annotations)
        except ApiException as exc:
            log.warning("cannot annotate %s %s/%s: %s", ref.kind, ref.namespace, ref.name, exc.reason)

    def _write_status(self) -> None:
        if self._status.inflight:
            self._dirty_status = True  # judged again once the write in flight has answered
            return
        info = self._info
        view = GateView(ent.PodCounts())
        if info is not None:
            view = GateView(
                counts=ent.count_pods(self._states()),
                ungated=sum(1 for uid in self._ungated if uid in self._pods),
                last_denial=self._last_denial,
                last_error=self._last_error,
                registration=cluster_scope.to_status(self._cluster),
            )
            self._set_gauges(info)
        write = self._status.plan(self._body(), info, view, self.rt.clock.now())
        if write is not None:
            self._status.inflight = True
            # The API call runs in the pool: the loop keeps dispatching pods meanwhile.
            self.rt.pool.submit(self._apply_status, write)

    def _apply_status(self, write: StatusWrite) -> None:
        ok = False
        try:
            ok = self._status.apply(write)
        finally:
            self._queue.put(("status", ok))

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
