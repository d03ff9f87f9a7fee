"""The work for one pod, in a gate worker thread: register it, verify, and write the outcome.

:class:`PodRegistration` turns a :class:`~metering_operator.domain.entitlement.Decision` into
API calls -- TokenRequest, STS, RegisterUsage (or the product's cluster registration), the
signature check, and the one guarded pod patch per transition -- and answers with a
:class:`PodResult`. It keeps no per-pod state: the product controller owns that and is the only
one to decide what happens next (retry, final, release).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.client.rest import ApiException

from metering_operator import metrics
from metering_operator.aws import errors as aws_errors
from metering_operator.domain import entitlement as ent
from metering_operator.domain.conditions import parse_time
from metering_operator.domain.product import (
    SCHEDULING_GATE,
    EntitlementMode,
    EntitlementScope,
    EntitlementState,
)
from metering_operator.domain.signature import SignatureError
from metering_operator.gate.cluster import ClusterRegistration
from metering_operator.gate.registrar import RegistrationSetupError
from metering_operator.gate.runtime import GateRuntime, ProductInfo
from metering_operator.kube.pods import PodGone, WorkloadRef, object_ref

log = logging.getLogger(__name__)

TRANSIENT_BACKOFF_BASE = 0.2
TRANSIENT_BACKOFF_CAP = 10.0


@dataclass
class PodResult:
    """What became of one pod, for the controller (which owns all per-pod state)."""

    uid: str
    outcome: ent.Outcome | None  # None: nothing happened (pod gone, stop requested)
    reason: str = ""
    workload: WorkloadRef | None = None
    ungated: bool = False


class PodRegistration:
    """Registers pods for one product controller; ``stop`` cuts retries short on shutdown."""

    def __init__(self, runtime: GateRuntime, stop: threading.Event) -> None:
        self.rt = runtime
        self._stop = stop

    def run(
        self,
        pod: dict[str, Any],
        info: ProductInfo,
        decision: ent.Decision,
        cluster: ClusterRegistration | None,
    ) -> PodResult:
        """Register (or release) one pod; never raises: every way out is a result."""
        uid = pod["metadata"]["uid"]
        try:
            return self._register(pod, info, decision, cluster)
        except PodGone:
            return PodResult(uid, None)
        except Exception as exc:
            log.exception("entitlement of pod %s/%s failed", info.namespace, pod["metadata"].get("name"))
            return PodResult(uid, ent.Outcome.ERROR, f"InternalError: {exc}")

    def _register(
        self,
        pod: dict[str, Any],
        info: ProductInfo,
        decision: ent.Decision,
        cluster: ClusterRegistration | None,
    ) -> PodResult:
        meta = pod["metadata"]
        uid, name = meta["uid"], meta["name"]
        code = info.spec.product_code
        audit = info.mode is EntitlementMode.AUDIT
        # The owner is looked up after the decisive write where possible: it is a summary, and a
        # ReplicaSet GET must not sit between a pod and its gate removal.
        workload: WorkloadRef | None = None
        if decision.action is ent.Action.RELEASE:
            self.rt.pods.write_with_retry(pod, self._release_ops)
            return PodResult(uid, None, workload=self._workload(pod))
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
                    signature_token = verified.token
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
                        return PodResult(uid, None, workload=workload)
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
                        return PodResult(uid, None, workload=workload)
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
            created = parse_time(meta.get("creationTimestamp"))
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
        return PodResult(uid, ent.Outcome.GRANTED, workload=self._workload(pod), ungated=decision.ungated)

    def _finish_denied(self, pod: dict[str, Any], info: ProductInfo, reason: str, audit: bool) -> PodResult:
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
        return PodResult(uid, ent.Outcome.DENIED, reason, self._workload(pod))

    def _finish_error(self, pod: dict[str, Any], info: ProductInfo, reason: str, audit: bool) -> PodResult:
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
        return PodResult(uid, ent.Outcome.ERROR, reason, self._workload(pod))

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
