"""kopf glue for the entitlement gate: the pod admission webhook and each MeteredProduct's lifecycle.

Nothing here decides anything (see :mod:`metering_operator.domain.entitlement`) or loops over
pods (see :mod:`metering_operator.gate.controller`). kopf watches MeteredProducts only; pods come
from the namespaces' shared pod cache, to which each product's controller subscribes with its
selector. Every product's controller is stepped by the one scheduler thread of the process
(:mod:`metering_operator.gate.scheduler`): the async kopf daemon only adds the product's
controller to it and removes it when the product goes away, and an event handler pushes each
change of the product to its controller (no thread per product, no polling).

:func:`register` is called by ``metering-operator run`` before kopf starts, because whether an
admission handler exists depends on the flags (kopf refuses to start with an admission handler
but no webhook server).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from metering_operator import metrics
from metering_operator.domain import entitlement as ent
from metering_operator.domain.clock import Clock, SystemClock
from metering_operator.domain.echoes import Fingerprints, gate_fingerprint
from metering_operator.domain.pins import resolve
from metering_operator.domain.product import (
    GROUP,
    PLURAL,
    SCHEDULING_GATE,
    VERSION,
    EntitlementMode,
    EntitlementSource,
    LabelSelector,
    MeteredProductSpec,
)
from metering_operator.domain.selectors import matches
from metering_operator.gate.controller import BODY_CHANGED, ProductController
from metering_operator.gate.licensing import Licensing
from metering_operator.gate.registrar import Registrar
from metering_operator.gate.runtime import GateRuntime
from metering_operator.gate.scheduler import Scheduler
from metering_operator.kube.apiclient import new_api_client
from metering_operator.kube.events import EventPoster
from metering_operator.kube.podcache import PodCache
from metering_operator.kube.pods import PodApi
from metering_operator.kube.records import DenialRecords
from metering_operator.kube.seat_records import SeatRecords
from metering_operator.kube.webhook import (
    HANDLER_ID,
    AdmissionServer,
    JsonPatch,
    delete_webhook_configuration,
)
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

#: Worker threads for RegisterUsage attempts (TokenRequest, STS, RegisterUsage: one attempt each).
AWS_WORKERS = 32
#: Worker threads for Kubernetes writes (pod patches, evictions, Events, status, workloads).
KUBE_WORKERS = 16


def build_runtime(
    settings: OperatorSettings,
    clock: Clock | None = None,
    cache: PodCache | None = None,
    scheduler: Scheduler | None = None,
) -> GateRuntime:
    api = new_api_client(pool_size=AWS_WORKERS + KUBE_WORKERS + 8)
    pods = PodApi(api)
    clock = clock or SystemClock()
    registrar = Registrar(api, pods, settings.region, clock, settings.token_expiration_seconds)
    return GateRuntime(
        api=api,
        pods=pods,
        events=EventPoster(api),
        registrar=registrar,
        aws_pool=ThreadPoolExecutor(max_workers=AWS_WORKERS, thread_name_prefix="gate-aws"),
        kube_pool=ThreadPoolExecutor(max_workers=KUBE_WORKERS, thread_name_prefix="gate-kube"),
        clock=clock,
        trusted_product_codes=settings.trusted_product_codes,
        records=DenialRecords(api, settings.operator_namespace),
        ungated_pod_action=settings.ungated_pod_action,
        pins=settings.pins,
        cache=cache,
        licensing=Licensing(registrar, SeatRecords(api, settings.operator_namespace), settings.region, clock),
        _scheduler=scheduler,
    )


# --- MeteredProducts ---------------------------------------------------------------------------------


# The index's entry per product, kept while its uid and generation stay (a status write leaves the
# spec, and so the entry, as it was): namespace/name -> (uid, generation, entry).
_indexed: dict[tuple[str, str], tuple[Any, Any, dict[str, Any]]] = {}


# No explicit id: kopf hands an index to handlers as a kwarg named after the handler's id.
# Async on purpose: kopf runs a sync handler in its executor, a thread hop per product event that
# costs more than the entry itself (most events are status writes, answered from ``_indexed``).
@kopf.index(GROUP, VERSION, PLURAL)
async def gate_products(
    namespace: str | None, name: str, spec: Any, meta: Any, memo: Any, **_: Any
) -> dict[str, Any]:
    """Per namespace: what the admission webhook needs to know about each product."""
    return gate_entry(namespace, name, spec, meta, memo.settings)


def gate_entry(
    namespace: str | None, name: str, spec: Any, meta: Any, settings: OperatorSettings
) -> dict[str, Any]:
    """The product's index entry, judged again only when its uid or generation moved."""
    key = (namespace or "", name)
    version = (meta.get("uid"), meta.get("generation"))
    known = _indexed.get(key)
    if known is not None and known[:2] == version:
        return dict(known[2])
    entry = _gate_entry(namespace, name, spec, settings)
    _indexed[key] = (*version, entry)
    return dict(entry)


def _gate_entry(namespace: str | None, name: str, spec: Any, settings: OperatorSettings) -> dict[str, Any]:
    try:
        parsed = MeteredProductSpec.model_validate(dict(spec))
    except ValueError:
        return {}
    # The effective spec: a pinned product keeps its pinned minimum mode here too.
    resolution = resolve(settings.pins, namespace or "", name, parsed)
    parsed = resolution.spec
    trusted = resolution.obeyed and (
        not settings.trusted_product_codes or parsed.product_code in settings.trusted_product_codes
    )
    return {namespace or "": (f"{namespace}/{name}", parsed.entitlement.mode, trusted, parsed.selector)}


def _gate_key(namespace: str | None, name: str) -> tuple[str, str, str]:
    return ("gate", namespace or "", name)


@kopf.daemon(GROUP, VERSION, PLURAL, id="entitlement-gate", cancellation_timeout=15.0)
async def gate_daemon(
    namespace: str | None, name: str, body: Any, memo: Any, stopped: kopf.DaemonStopped, **_: Any
) -> None:
    """The product's lifecycle: its controller is stepped by the scheduler until it goes away.

    An async daemon that only waits, rather than a sync daemon or a thread: kopf runs sync
    daemons in its bounded executor, and a thread per product is what the scheduler replaces.
    ``body`` is kopf's live view of the product, kept current by kopf's watch.
    """
    runtime: GateRuntime = memo.gate_runtime
    controller = ProductController(runtime, namespace or "", name, lambda: body)
    scheduler = runtime.scheduler
    try:
        await asyncio.wrap_future(scheduler.add(controller, _gate_key(namespace, name)))
        await stopped.wait()
    finally:
        if stopped.reason is not None and kopf.DaemonStoppingReason.RESOURCE_DELETED in stopped.reason:
            # Ended in a task of its own: kopf removes a deleted product's finalizer at once only
            # if its daemons exit within a few loop cycles of the stop flag; otherwise it holds
            # the deletion back for the whole cancellation timeout, however soon they end.
            task = asyncio.create_task(_end_deleted(runtime, controller, namespace or "", name, body))
            _endings.add(task)
            task.add_done_callback(_endings.discard)
        else:
            # Done once its timers are dropped and its pod subscription closed.
            await asyncio.wrap_future(scheduler.remove(controller))


#: Deleted products' endings in flight (a reference, so the loop does not drop the task).
_endings: set[asyncio.Task[None]] = set()


async def _end_deleted(
    runtime: GateRuntime, controller: ProductController, namespace: str, name: str, body: Any
) -> None:
    """A deleted product: its controller removed, then its seats returned."""
    try:
        await asyncio.wrap_future(runtime.scheduler.remove(controller))
        await _release_seats(runtime, namespace, name, body)
    except Exception:
        log.exception("ending the deleted MeteredProduct %s/%s failed", namespace, name)


async def _release_seats(runtime: GateRuntime, namespace: str, name: str, body: Any) -> None:
    """A deleted contract product's seats go back now (its pods are no longer gated by it), not when
    each lease lapses. Not on the operator's own stop: the next start extends the running pods'."""
    spec = body.get("spec") or {}
    entitlement = spec.get("entitlement") or {}
    if runtime.licensing is None or entitlement.get("source") != EntitlementSource.LICENSE_MANAGER.value:
        return
    returned = await asyncio.to_thread(
        runtime.licensing.release_all, namespace, name, str(spec.get("productCode") or "")
    )
    if returned:
        log.info("MeteredProduct %s/%s deleted: %d seat lease(s) checked in", namespace, name, returned)


#: Per product, what the controller reacts to in the last event it was told of.
_gate_seen = Fingerprints()
_GATE_ACTED = metrics.PRODUCT_EVENTS.labels("entitlement-gate-changes", "acted")
_GATE_SKIPPED = metrics.PRODUCT_EVENTS.labels("entitlement-gate-changes", "skipped")


@kopf.on.event(GROUP, VERSION, PLURAL, id="entitlement-gate-changes")
async def gate_product_changed(
    event: Any, namespace: str | None, name: str, body: Any, memo: Any, **_: Any
) -> None:
    """Push each change of a MeteredProduct that its controller reacts to (spec, or the metering
    side's conditions; :func:`~metering_operator.domain.echoes.gate_fingerprint`) to the
    controller, which reads kopf's live body: kopf has updated it before calling this. The
    echoes of status writes (the gate's own, metering's, the reporter's) change none of it and
    are dropped here, without waking the scheduler."""
    runtime: GateRuntime | None = getattr(memo, "gate_runtime", None)
    key = _gate_key(namespace, name)
    if event.get("type") == "DELETED":
        _gate_seen.forget(key)
        _indexed.pop(key[1:], None)
    elif not _gate_seen.changed(key, gate_fingerprint(body)):
        _GATE_SKIPPED.inc()
        return
    _GATE_ACTED.inc()
    if runtime is not None:
        # Not yet added (the daemon starts after this handler's first call): it reads the live
        # body when it starts, so nothing is lost.
        runtime.scheduler.post_to(key, BODY_CHANGED)


@kopf.on.cleanup()
async def gate_cleanup(memo: kopf.Memo, **_: Any) -> None:
    runtime: GateRuntime | None = getattr(memo, "gate_runtime", None)
    if runtime is not None:
        await asyncio.to_thread(runtime.shutdown)
    settings: OperatorSettings | None = getattr(memo, "settings", None)
    if settings is not None and settings.webhook_enabled and settings.webhook_url:
        # Local mode: the configuration points at this process's own URL. Left behind, it would make
        # the API server wait out the webhook timeout on every pod creation while no operator runs.
        api = new_api_client(pool_size=1)
        try:
            await asyncio.to_thread(delete_webhook_configuration, api, settings.webhook_configuration_name)
        finally:
            api.close()


# --- the admission webhook ---------------------------------------------------------------------------


GateProducts = Iterable[tuple[str, EntitlementMode, bool, LabelSelector]]


def _gating_product(body: Mapping[str, Any], products: GateProducts) -> str | None:
    labels = body.get("metadata", {}).get("labels") or {}
    candidates = [
        ent.GateCandidate(key, mode, trusted, matches(selector, labels))
        for key, mode, trusted, selector in products
    ]
    return ent.gating_product(body, candidates)


def _gates_with_ours(body: Mapping[str, Any]) -> list[Any]:
    existing = list(body.get("spec", {}).get("schedulingGates") or [])
    return [*existing, {"name": SCHEDULING_GATE}]


def gate_pod(body: Any, patch: kopf.Patch, products: GateProducts) -> str | None:
    """Add the gate to ``patch`` if an Enforce-mode product selects the pod; returns that product."""
    product = _gating_product(body, products)
    if product is not None:
        patch.spec["schedulingGates"] = _gates_with_ours(body)
    return product


def gate_ops(body: Mapping[str, Any], products: GateProducts) -> JsonPatch | None:
    """:func:`gate_pod` as JSON-patch ops (the direct webhook path answers with these)."""
    if _gating_product(body, products) is None:
        return None
    return [{"op": "add", "path": "/spec/schedulingGates", "value": _gates_with_ours(body)}]


class DirectGate:
    """The webhook's decision without kopf's per-request machinery (:class:`AdmissionServer`).

    The same rule as :func:`gate_pods_webhook`, read from the same kopf index (a live mapping
    that kopf keeps current), and the same failure rule: never raises, never refuses a pod.
    """

    def __init__(self, index: Mapping[str, Any]) -> None:
        self.index = index

    def __call__(self, request: Mapping[str, Any]) -> JsonPatch | None:
        try:
            if request.get("operation") != "CREATE":
                return None
            body = request.get("object") or {}
            namespace = body.get("metadata", {}).get("namespace") or request.get("namespace") or ""
            products = list(self.index.get(namespace, []))
            if not products:
                return None
            return gate_ops(body, products)
        except Exception:
            log.exception("admission of a pod failed; letting it through ungated")
            return None


async def gate_pods_webhook(
    body: Any, patch: kopf.Patch, logger: logging.Logger | logging.LoggerAdapter[Any], **kwargs: Any
) -> None:
    """Never raises: kopf answers a handler exception by refusing the pod, and a bug in the gate
    must not stop a buyer's pods from being created (the product watch still finds them)."""
    try:
        gate_products: kopf.Index[str, Any] = kwargs["gate_products"]
        namespace = body.get("metadata", {}).get("namespace") or ""
        products = list(gate_products.get(namespace, []))
        if not products:
            return
        product = gate_pod(body, patch, products)
        if product is not None:
            logger.debug("gating new pod for %s", product)
    except Exception:
        log.exception("admission of a pod failed; letting it through ungated")


def direct_admission(memo: Any, **kwargs: Any) -> None:
    """At startup: the webhook server answers the gate's requests directly from the index."""
    server = getattr(memo, "admission_server", None)
    index = kwargs.get("gate_products")
    if isinstance(server, AdmissionServer) and index is not None:
        server.direct[HANDLER_ID] = DirectGate(index)


def register(settings: OperatorSettings) -> None:
    """Register the admission handler when the webhook is enabled (kopf needs a server for it).

    kopf's handler stays registered (kopf serves it if the direct path is not set up), but with
    an :class:`AdmissionServer` in ``memo.admission_server`` its requests are answered by
    :class:`DirectGate`.
    """
    if settings.webhook_enabled:
        kopf.on.mutate("v1", "pods", id=HANDLER_ID, operations=["CREATE"], ignore_failures=True)(
            gate_pods_webhook
        )
        kopf.on.startup(id="gate-direct-admission")(direct_admission)
