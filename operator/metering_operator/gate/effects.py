"""Carrying out the gate's effects: each function makes the API calls of one effect of
:mod:`metering_operator.gate.machine` and answers with the message the machine gets back.

They run in the runtime's worker threads (``aws_pool`` for RegisterUsage, ``kube_pool`` for the
rest), make one attempt and never sleep: a failure becomes a message, and the machine schedules
the retry with its one backoff. None of them raises.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.rest import ApiException

from metering_operator import metrics
from metering_operator.aws import errors as aws_errors
from metering_operator.domain import entitlement as ent
from metering_operator.domain.conditions import parse_time
from metering_operator.domain.license_seats import CLUSTER_HOLDER, SeatAction
from metering_operator.domain.license_token import LicenseTokenError
from metering_operator.domain.product import EntitlementMode, EntitlementState
from metering_operator.domain.signature import SignatureError
from metering_operator.gate import cluster as cluster_scope
from metering_operator.gate import model as m
from metering_operator.gate.licensing import LicenseRefused, PodGoneError, SeatsExhausted
from metering_operator.gate.product import ProductInfo
from metering_operator.gate.registrar import RegistrationSetupError
from metering_operator.gate.runtime import GateRuntime
from metering_operator.kube.pods import JsonPatch, PodGone, WorkloadRef, object_ref

log = logging.getLogger(__name__)


def _labels(info: ProductInfo) -> tuple[str, str, str]:
    return info.namespace, info.name, info.spec.product_code


def _transient_api(exc: ApiException) -> bool:
    return exc.status in (429, None) or (exc.status or 0) >= 500


# --- registration (aws_pool) -------------------------------------------------------------------------


def register(rt: GateRuntime, effect: m.Register) -> m.Registered:
    """One RegisterUsage attempt for the pod, verified; the outcome as a message."""
    pod, info = effect.pod, effect.info
    uid = str(pod["metadata"]["uid"])
    labels = _labels(info)
    try:
        verified = rt.registrar.register_pod(pod, info.product_key())
    except aws_errors.MeteringError as exc:
        reason = f"{exc.code}: {exc.message}"
        if exc.operation == aws_errors.REGISTER_USAGE and exc.denied:
            metrics.REGISTRATIONS.labels(*labels, "denied").inc()
            return m.Registered(uid, m.Denied(reason))
        metrics.REGISTRATIONS.labels(*labels, "retried" if exc.retryable else "error").inc()
        return m.Registered(uid, m.Failed(reason, transient=exc.retryable))
    except RegistrationSetupError as exc:
        metrics.REGISTRATIONS.labels(*labels, "error").inc()
        return m.Registered(uid, m.Failed(str(exc), transient=False))
    except SignatureError as exc:
        metrics.REGISTRATIONS.labels(*labels, "error").inc()
        return m.Registered(uid, m.Failed(f"InvalidSignature: {exc}", transient=False))
    except ApiException as exc:
        if exc.status == 404:
            return m.Registered(uid, m.Vanished())
        metrics.REGISTRATIONS.labels(*labels, "retried" if _transient_api(exc) else "error").inc()
        reason = f"KubernetesApi{exc.status}: {exc.reason}"
        return m.Registered(uid, m.Failed(reason, transient=_transient_api(exc)))
    except Exception as exc:
        log.exception("registration of pod %s/%s failed", info.namespace, pod["metadata"].get("name"))
        metrics.REGISTRATIONS.labels(*labels, "error").inc()
        return m.Registered(uid, m.Failed(f"InternalError: {exc}", transient=False))
    metrics.REGISTRATIONS.labels(*labels, "granted").inc()
    return m.Registered(uid, m.Granted(verified.token, verified.issued_at))


def register_cluster(
    rt: GateRuntime, effect: m.RegisterCluster, stored: Mapping[str, Any] | None
) -> m.ClusterDone:
    """Scope Cluster: reuse a provable ``status.registration`` (only when the machine has none
    yet, i.e. after a start), else one RegisterUsage as the operator."""
    info, attempts = effect.info, effect.attempts
    nonce = ""
    try:
        nonce = rt.kube_system_uid()
        if effect.previous is None:
            restored = cluster_scope.restore(stored, info.product_key(), nonce, rt.clock.now())
            if restored is not None:
                return m.ClusterDone(restored)
        verified = rt.registrar.register_cluster(info.product_key(), nonce)
        return m.ClusterDone(cluster_scope.granted(verified, nonce, attempts, rt.clock.now()))
    except aws_errors.MeteringError as exc:
        reason = f"{exc.code}: {exc.message}"
        denied, transient = cluster_scope.classify(exc)
        if denied:
            return m.ClusterDone(cluster_scope.denied(nonce, reason, attempts))
        return m.ClusterDone(cluster_scope.failed(effect.previous, reason, transient, attempts), transient)
    except SignatureError as exc:
        reason = f"InvalidSignature: {exc}"
        return m.ClusterDone(cluster_scope.failed(effect.previous, reason, False, attempts))
    except Exception as exc:
        log.exception("cluster registration for %s failed", info.key)
        return m.ClusterDone(cluster_scope.failed(effect.previous, f"InternalError: {exc}", True, attempts))


# --- License Manager (aws_pool) ----------------------------------------------------------------------


def _seat_labels(info: ProductInfo) -> tuple[str, str, str]:
    return info.namespace, info.name, info.spec.product_code


def checkout(rt: GateRuntime, effect: m.Checkout) -> m.Registered:
    """One CheckoutLicense for the pod, verified and recorded; the outcome as a message."""
    pod, info = effect.pod, effect.info
    meta = pod["metadata"]
    # Scope Pod: the pod's own IRSA identity; scope Cluster: the operator's.
    service_account = (
        None if info.cluster_scope else str(pod.get("spec", {}).get("serviceAccountName") or "default")
    )
    return _checkout(
        rt,
        info,
        str(meta["uid"]),
        effect.count,
        pod_name=str(meta.get("name", "")),
        service_account=service_account,
    )


def checkout_cluster(rt: GateRuntime, effect: m.CheckoutCluster) -> m.Registered:
    """The product's per-cluster entitlements, checked out once as the operator."""
    return _checkout(rt, effect.info, CLUSTER_HOLDER, effect.count, pod_name="", service_account=None)


def _checkout(
    rt: GateRuntime,
    info: ProductInfo,
    uid: str,
    count: int,
    *,
    pod_name: str,
    service_account: str | None,
) -> m.Registered:
    source = info.license
    if rt.licensing is None or source is None:
        return m.Registered(uid, m.Failed("InternalError: License Manager is not set up", transient=False))
    try:
        seat = rt.licensing.checkout(
            namespace=info.namespace,
            product=info.name,
            product_uid=info.uid,
            product_code=info.spec.product_code,
            source=source,
            issuer_key=info.issuer_key,
            holder=uid,
            count=count,
            pod_name=pod_name,
            service_account=service_account,
        )
    except SeatsExhausted as exc:
        return m.Registered(uid, m.Exhausted(str(exc), count))
    except PodGoneError:
        return m.Registered(uid, m.Vanished())
    except LicenseRefused as exc:
        return m.Registered(uid, m.Denied(str(exc)))
    except aws_errors.MeteringError as exc:
        reason = f"{exc.code}: {exc.message}"
        if exc.denied:
            return m.Registered(uid, m.Denied(reason))
        return m.Registered(uid, m.Failed(reason, transient=exc.retryable))
    except RegistrationSetupError as exc:
        return m.Registered(uid, m.Failed(str(exc), transient=False))
    except LicenseTokenError as exc:
        return m.Registered(uid, m.Failed(f"InvalidSignedToken: {exc}", transient=False))
    except ApiException as exc:
        if exc.status == 404:
            return m.Registered(uid, m.Vanished())
        reason = f"KubernetesApi{exc.status}: {exc.reason}"
        return m.Registered(uid, m.Failed(reason, transient=_transient_api(exc)))
    except Exception as exc:
        log.exception("checkout for %s of %s failed", pod_name or uid, info.key)
        return m.Registered(uid, m.Failed(f"InternalError: {exc}", transient=False))
    return m.Registered(uid, m.Granted(seat.signed, seat.issued_at, seat=seat))


def seat_op(rt: GateRuntime, effect: m.SeatOp) -> m.SeatDone:
    """ExtendLicenseConsumption or CheckInLicense of one lease; the outcome as a message."""
    info, seat, action = effect.info, effect.seat, effect.action
    if rt.licensing is None:
        return m.SeatDone(seat.holder, action, error="License Manager is not set up")
    labels = _seat_labels(info)
    try:
        if action is SeatAction.EXTEND:
            return m.SeatDone(seat.holder, action, seat=rt.licensing.extend(*labels, seat))
        rt.licensing.check_in(*labels, seat)
        return m.SeatDone(seat.holder, action)
    except aws_errors.MeteringError as exc:
        if exc.category is aws_errors.ErrorCategory.GONE:
            return m.SeatDone(seat.holder, action, gone=True)
        return m.SeatDone(seat.holder, action, error=f"{exc.code}: {exc.message}")
    except ApiException as exc:
        return m.SeatDone(seat.holder, action, error=f"KubernetesApi{exc.status}: {exc.reason}")
    except Exception as exc:
        log.exception("%s of %s for %s failed", action.value, seat.holder, info.key)
        return m.SeatDone(seat.holder, action, error=f"InternalError: {exc}")


def load_seats(rt: GateRuntime, effect: m.LoadSeats) -> m.SeatsLoaded:
    if rt.licensing is None:
        return m.SeatsLoaded(None, "License Manager is not set up")
    try:
        return m.SeatsLoaded(rt.licensing.load(effect.info.namespace, effect.info.name))
    except ApiException as exc:
        # No pod of the product is decided without it: a lease on record must not be checked out twice.
        log.error("seat record of %s not read: %s %s", effect.info.key, exc.status, exc.reason)
        return m.SeatsLoaded(None, f"KubernetesApi{exc.status}: {exc.reason} (seat record)")


def forget_seat(rt: GateRuntime, effect: m.ForgetSeat) -> None:
    if rt.licensing is None:
        return
    try:
        rt.licensing.forget(effect.info.namespace, effect.info.name, effect.holder)
    except ApiException as exc:
        log.warning("seat record of %s not pruned: %s %s", effect.info.key, exc.status, exc.reason)


# --- pod writes (kube_pool) --------------------------------------------------------------------------


def _write(
    rt: GateRuntime,
    uid: str,
    pod: Mapping[str, Any],
    make_ops: Callable[[Mapping[str, Any]], JsonPatch | None],
) -> tuple[Mapping[str, Any] | None, str | None]:
    """``make_ops`` on the freshest pod, guarded; returns (the pod as it now is, error)."""
    seen: list[Mapping[str, Any]] = [pod]

    def ops(current: Mapping[str, Any]) -> JsonPatch | None:
        seen.append(current)
        if current.get("metadata", {}).get("uid") != uid:
            raise PodGone(uid)
        return make_ops(current)

    try:
        written = rt.pods.write_with_retry(pod, ops)
    except PodGone:
        return None, None
    except ApiException as exc:
        return None, f"KubernetesApi{exc.status}: {exc.reason}"
    except Exception as exc:  # e.g. still conflicting after several re-reads
        return None, str(exc)
    return (written if written is not None else seen[-1]), None


def _workload(rt: GateRuntime, pod: Mapping[str, Any]) -> WorkloadRef | None:
    try:
        return rt.pods.owner_workload(pod)
    except ApiException as exc:
        log.warning("cannot resolve the owner of pod %s: %s", pod["metadata"].get("name"), exc.reason)
        return None


def find_workload(rt: GateRuntime, effect: m.FindWorkload) -> m.WorkloadFound:
    return m.WorkloadFound(str(effect.pod["metadata"]["uid"]), _workload(rt, effect.pod))


def write_grant(rt: GateRuntime, effect: m.WriteGrant) -> m.Written:
    pod, info, proof = effect.pod, effect.info, effect.proof
    uid = str(pod["metadata"]["uid"])
    registered_at = proof.issued_at or effect.at
    was_gated = ent.is_gated(pod)

    def ops(current: Mapping[str, Any]) -> JsonPatch | None:
        if not ent.is_gated(current) and ent.annotated_signature(current) == proof.token:
            return None  # says so already
        return ent.grant_patch(
            current, signature=proof.token, registered_at=registered_at, product_key=info.key
        )

    written, error = _write(rt, uid, pod, ops)
    if written is not None and error is None and was_gated and not ent.is_gated(written):
        created = parse_time(pod.get("metadata", {}).get("creationTimestamp"))
        if created is not None:
            latency = max(0.0, (rt.clock.now() - created).total_seconds())
            metrics.GATE_LATENCY.labels(*_labels(info)).observe(latency)
        if rt.post_grant_events:
            what = (
                f"License Manager checkout granted for {info.key} ({info.license.product_sku}); "
                "signed token verified and recorded, gate removed"
                if info.license is not None
                else f"RegisterUsage granted for {info.key} ({info.spec.product_code}); "
                "signature verified, gate removed"
            )
            rt.events.post(object_ref(pod, "Pod", "v1"), "Normal", "Registered", what)
        log.info("pod %s/%s granted for %s", info.namespace, pod["metadata"].get("name"), info.key)
    return m.Written(uid, written, error, _workload(rt, pod) if error is None else None)


def write_state(rt: GateRuntime, effect: m.WriteState) -> m.Written:
    pod, info = effect.pod, effect.info
    uid = str(pod["metadata"]["uid"])

    def ops(current: Mapping[str, Any]) -> JsonPatch | None:
        release = effect.release and ent.is_gated(current)
        if not release and not ent.needs_state_write(current, effect.state, effect.reason):
            return None
        return ent.state_patch(current, effect.state, effect.reason, product_key=info.key, release=release)

    written, error = _write(rt, uid, pod, ops)
    return m.Written(uid, written, error, _workload(rt, pod) if error is None else None)


def deny(rt: GateRuntime, effect: m.Deny) -> m.Written:
    """The operator's durable record first, then the pod's annotation, then the Events."""
    pod, info = effect.pod, effect.info
    uid, name = str(pod["metadata"]["uid"]), str(pod["metadata"].get("name", ""))
    if effect.durable:
        try:
            rt.records.add(info.namespace, info.name, uid, name, effect.reason, effect.at)
        except ApiException as exc:
            log.warning(
                "denial of pod %s/%s not recorded: %s %s", info.namespace, name, exc.status, exc.reason
            )
            return m.Written(uid, None, f"KubernetesApi{exc.status}: {exc.reason} (denial record)")
    result = write_state(
        rt, m.WriteState(pod, info, EntitlementState.DENIED, effect.reason, release=effect.release)
    )
    if result.error is None:
        audit = info.mode is EntitlementMode.AUDIT
        gated = ent.is_gated(result.pod) if result.pod is not None else ent.is_gated(pod)
        tail = (
            " (audit mode: the pod is not held)"
            if audit
            else "; the pod stays gated (final)"
            if gated
            else "; the pod runs without the gate"
        )
        by = "License Manager" if info.license is not None else "RegisterUsage"
        message = f"{by} denied for {info.key}: {effect.reason}{tail}"
        rt.events.post(object_ref(pod, "Pod", "v1"), "Warning", "EntitlementDenied", message)
        rt.events.post(info.ref(), "Warning", "EntitlementDenied", f"pod {name}: {message}")
        log.warning("pod %s/%s denied: %s", info.namespace, name, effect.reason)
    return result


def evict(rt: GateRuntime, effect: m.Evict) -> m.Evicted:
    pod, info = effect.pod, effect.info
    meta = pod["metadata"]
    uid = str(meta["uid"])
    cause = effect.cause
    try:
        rt.pods.evict(str(meta["namespace"]), str(meta["name"]), uid)
    except PodGone:
        return m.Evicted(uid, pod, effect.reason, gone=True, cause=cause)
    except ApiException as exc:
        # 429: a PodDisruptionBudget disallows it now; 409: the uid precondition (a new pod).
        if exc.status == 409:
            return m.Evicted(uid, pod, effect.reason, gone=True, cause=cause)
        error = f"KubernetesApi{exc.status}: {exc.reason}"
        return m.Evicted(uid, pod, effect.reason, error, transient=_transient_api(exc), cause=cause)
    if cause == "ungated":
        metrics.UNGATED_PODS.labels(*_labels(info), "evicted").inc()
    log.warning(
        "evicted pod %s/%s of %s (%s)",
        info.namespace,
        meta["name"],
        info.key,
        effect.reason,
    )
    return m.Evicted(uid, pod, effect.reason, cause=cause)


def post_event(rt: GateRuntime, effect: m.PostEvent) -> None:
    rt.events.post(effect.ref, effect.type, effect.reason, effect.message)


def prune_denials(rt: GateRuntime, effect: m.PruneDenials) -> None:
    try:
        rt.records.prune(effect.info.namespace, effect.info.name, effect.uids)
    except ApiException as exc:
        log.warning("denial record of %s not pruned: %s %s", effect.info.key, exc.status, exc.reason)
