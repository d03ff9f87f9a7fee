"""The per-MeteredProduct controller of the entitlement gate: the state machine's runtime.

One :class:`ProductController` per MeteredProduct, a plain object with no thread or loop of its
own: the process's one :class:`~metering_operator.gate.scheduler.Scheduler` steps every product's
controller. It subscribes to its namespace's shared pod cache
(:mod:`metering_operator.kube.podcache`: one list + watch per namespace for every product and for
metering) with the product's selector, and feeds everything that happens -- pod events, worker
results, timers, product changes -- as messages into the pure
:func:`metering_operator.gate.machine.step`, then carries out the effects it returns:

* RegisterUsage attempts go to the shared ``aws_pool``; pod writes, evictions, Events, status
  writes and workload summaries to the shared ``kube_pool`` -- so none of those waits behind AWS;
* retries are :class:`~metering_operator.gate.machine.Schedule` effects, timers of the scheduler
  delivered as ``Due`` messages when their time comes: no worker ever sleeps, and a throttled
  product holds at most ``max_inflight`` AWS workers, never another product's pods.

All of the controller's state is touched by the scheduler's thread only: the cache's namespace
threads and the workers :meth:`~metering_operator.gate.scheduler.Scheduler.post` to it, and a
change of the product (kopf's watch of MeteredProducts) arrives as :data:`BODY_CHANGED`, pushed by
the kopf glue -- the product is not polled.

Status (counts, ``Ready``/``Entitled`` conditions, ``observedGeneration``, scope Cluster's
``registration``) is written by :mod:`metering_operator.gate.status` with server-side apply, at
most every :data:`FLUSH_INTERVAL_SECONDS` and only when it differs from what the object already
says. This is the only writer of ``Ready``
(:func:`metering_operator.domain.readiness.ready_condition`), which also judges the
``Metering`` condition the metering handlers own and write; the controller re-judges Ready
when that condition's verdict changes on the (live) object. The product's subscription ends the
moment the controller is removed from the scheduler (deletion); the namespace's watch ends with
its last subscriber.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import logging
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, assert_never

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from kubernetes import client
from kubernetes.client.rest import ApiException
from pydantic import ValidationError

from metering_operator import metrics
from metering_operator.domain import entitlement as ent
from metering_operator.domain import onfailure
from metering_operator.domain.cached_pod import CachedPod
from metering_operator.domain.conditions import get_condition
from metering_operator.domain.pins import Resolution, resolve
from metering_operator.domain.product import (
    EntitlementMode,
    EntitlementSource,
    LabelSelector,
    MeteredProductSpec,
    PublicKeySource,
)
from metering_operator.domain.readiness import metering_rejects
from metering_operator.domain.selectors import to_query
from metering_operator.domain.signature import SignatureError, load_public_key
from metering_operator.gate import effects as fx
from metering_operator.gate import machine
from metering_operator.gate import model as m
from metering_operator.gate.product import ProductInfo
from metering_operator.gate.runtime import GateRuntime
from metering_operator.gate.scheduler import RECOVER, Scheduler
from metering_operator.gate.status import GateView, StatusWrite, StatusWriter
from metering_operator.kube.podcache import Subscription
from metering_operator.kube.pods import WorkloadRef
from metering_operator.kube.records import record_name

log = logging.getLogger(__name__)

#: Status and workload annotations are coalesced: a burst of 200 grants is a handful of writes.
FLUSH_INTERVAL_SECONDS = 0.5
#: A key from a ConfigMap is re-read this often (the product itself is pushed, never polled).
KEY_REFRESH_SECONDS = 60.0
#: A listing whose denial record could not be read is tried again after this long.
LISTING_RETRY_SECONDS = 1.0


class _Timer(enum.Enum):
    """The controller's own timers (the state machine's are strings: a pod's uid, CLUSTER, SEATS)."""

    FLUSH = "flush"
    LISTING = "listing"
    KEY = "key"


#: The message the kopf glue posts when the MeteredProduct changed (its live body has the change).
BODY_CHANGED = "body-changed"
#: The controller's own note that a status write answered (True: done or nothing left to do).
_StatusDone = bool
#: (watch token, or 0 for workers' answers; the message). Status answers use token -1.
Envelope = tuple[int, "m.Message | _Listing | _Denials | _ProductRead | _StatusDone"]


class ProductController:
    """One product's gate, stepped by ``scheduler`` (see the module docstring)."""

    def __init__(
        self,
        runtime: GateRuntime,
        namespace: str,
        name: str,
        body: Callable[[], Mapping[str, Any]],
        policy: m.GatePolicy | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.rt = runtime
        self.namespace = namespace
        self.name = name
        self.sched = scheduler or runtime.scheduler
        self._body = body
        self.state = m.GateState(policy=policy or m.GatePolicy(ungated_action=runtime.ungated_pod_action))
        self._info_version: tuple[Any, ...] | None = None
        self._watch_token = 0
        self._watch_selector: str | None = None
        self._subscription: Subscription | None = None
        #: A listing waiting for its denial record: (token, pods); the read in flight or not.
        self._listing: tuple[int, tuple[m.Pod, ...]] | None = None
        self._denials_inflight = False
        #: A product read (keys from ConfigMaps) in the kube pool; another change came meanwhile.
        self._reading = False
        self._reread = False
        #: This subscription's pod messages that came while the listing waits (in order).
        self._held: list[m.Message] = []
        self._stopped = False
        self._dirty = True
        self._flush_pending = False
        self._key_pending = False
        self._last_flush = -1e18
        self._status = StatusWriter(runtime, namespace, name)
        self._metering_verdict: tuple[Any, ...] | None = None
        self._workloads_written: dict[WorkloadRef, dict[str, str]] = {}
        self._gauge_states: set[str] = set()
        self._seat_gauge = False

    def __repr__(self) -> str:
        return f"gate controller of {self.namespace}/{self.name}"

    # ------------------------------------------------------------------------------------------
    # the scheduler's calls (its thread only)

    def started(self) -> None:
        self._product_changed()

    def receive(self, message: Any) -> None:
        if message is BODY_CHANGED:
            self._product_changed()
        else:
            self._deliver(message)

    def due(self, key: Hashable) -> None:
        if isinstance(key, str):
            if key == RECOVER:
                # After a failure: look at everything again, as the old loop's next round did.
                self._info_version = None
                self._product_changed()
                self._retry_listing()
                self._touch()
            else:
                self.dispatch(m.Due(key))
        elif key is _Timer.FLUSH:
            self._flush_pending = False
            self._flush()
        elif key is _Timer.LISTING:
            self._retry_listing()
        elif key is _Timer.KEY:
            self._key_pending = False
            self._info_version = None  # re-read the key even though the generation is the same
            self._product_changed()

    def stopped(self) -> None:
        self._stopped = True
        self._unsubscribe()
        self._clear_gauges()

    def dispatch(self, message: m.Message) -> None:
        """One step of the state machine, and its effects carried out."""
        self.state, effects = machine.step(self.state, message, self.rt.clock.now())
        self._touch()
        for effect in effects:
            self._execute(effect)

    def _product_changed(self) -> None:
        self._refresh_product()
        self._notice_metering()
        self._notice_hold()

    def _touch(self) -> None:
        """Something changed: flush status and workloads, at most every FLUSH_INTERVAL_SECONDS."""
        self._dirty = True
        if not self._flush_pending:
            self._flush_pending = True
            wait = self._last_flush + FLUSH_INTERVAL_SECONDS - self.sched.monotonic()
            self.sched.after(self, max(0.0, wait), _Timer.FLUSH)

    def _deliver(self, envelope: Envelope) -> None:
        token, message = envelope
        if token == -1:
            self._status.inflight = False
            if not message:
                self._status.forget()
                self._dirty = True
            if self._dirty:
                self._touch()  # changes that came while the write was in flight
            return
        if isinstance(message, _Denials):
            self._listed(token, message)  # before the token check: it ends the read in flight
            return
        if token and token != self._watch_token:
            return  # from a subscription that has been replaced
        assert not isinstance(message, bool)
        if isinstance(message, _Listing):
            self._take_listing(token, message.pods)
        elif isinstance(message, _ProductRead):
            self._apply_product(message)
        elif token and self._listing is not None:
            self._held.append(message)  # after the listing that waits for its denial record
        else:
            self.dispatch(message)

    # ------------------------------------------------------------------------------------------
    # effects

    def _execute(self, effect: m.Effect) -> None:
        rt = self.rt
        if isinstance(effect, m.Schedule):
            self.sched.at(self, effect.at, effect.key)
        elif isinstance(effect, m.Register):
            self._submit(rt.aws_pool, fx.register, effect)
        elif isinstance(effect, m.RegisterCluster):
            stored = (self._body().get("status") or {}).get("registration")
            stored = copy.deepcopy(dict(stored)) if stored else None
            rt.aws_pool.submit(self._answer, lambda: fx.register_cluster(rt, effect, stored))
        elif isinstance(effect, m.WriteGrant):
            self._submit(rt.kube_pool, fx.write_grant, effect)
        elif isinstance(effect, m.WriteState):
            self._submit(rt.kube_pool, fx.write_state, effect)
        elif isinstance(effect, m.Deny):
            self._submit(rt.kube_pool, fx.deny, effect)
        elif isinstance(effect, m.Evict):
            self._submit(rt.kube_pool, fx.evict, effect)
        elif isinstance(effect, m.PostEvent):
            if effect.reason == "UngatedPodReported" and effect.ref.get("kind") == "Pod":
                info = self.state.info
                if info is not None:
                    metrics.UNGATED_PODS.labels(
                        info.namespace, info.name, info.spec.product_code, "reported"
                    ).inc()
            rt.kube_pool.submit(fx.post_event, rt, effect)
        elif isinstance(effect, m.FindWorkload):
            self._submit(rt.kube_pool, fx.find_workload, effect)
        elif isinstance(effect, m.PruneDenials):
            rt.kube_pool.submit(fx.prune_denials, rt, effect)
        elif isinstance(effect, m.Checkout):
            self._submit(rt.aws_pool, fx.checkout, effect)
        elif isinstance(effect, m.CheckoutCluster):
            self._submit(rt.aws_pool, fx.checkout_cluster, effect)
        elif isinstance(effect, m.SeatOp):
            self._submit(rt.aws_pool, fx.seat_op, effect)
        elif isinstance(effect, m.LoadSeats):
            self._submit(rt.kube_pool, fx.load_seats, effect)
        elif isinstance(effect, m.ForgetSeat):
            rt.kube_pool.submit(fx.forget_seat, rt, effect)
        else:
            assert_never(effect)  # mypy proves every effect is carried out

    def _submit(self, pool: Any, work: Callable[[GateRuntime, Any], m.Message], effect: Any) -> None:
        pool.submit(self._answer, lambda: work(self.rt, effect))

    def _answer(self, work: Callable[[], m.Message]) -> None:
        if self._stopped:
            return
        self.sched.post(self, (0, work()))

    # ------------------------------------------------------------------------------------------
    # product

    def _refresh_product(self) -> None:
        """The product's generation (or uid) changed: judge its spec again. A key in a ConfigMap
        is read in the kube pool (never a Kubernetes call on the scheduler's thread); one read at
        a time, and a change that comes meanwhile is read after it."""
        body = self._body()
        meta = body.get("metadata", {})
        version = (meta.get("generation"), meta.get("uid"))
        if version == self._info_version:
            return  # a status change (or our own write): nothing of the gate's product changed
        if self._reading:
            self._reread = True
            return
        self._info_version = version
        uid, generation = str(meta.get("uid", "")), int(meta.get("generation") or 0)
        try:
            spec = MeteredProductSpec.model_validate(copy.deepcopy(dict(body.get("spec") or {})))
        except ValidationError as exc:
            log.error("MeteredProduct %s/%s has an invalid spec: %s", self.namespace, self.name, exc)
            self.dispatch(m.ProductChanged(None))
            return
        # The seam: from here on the gate sees the effective spec, the seller's pins applied.
        resolution = resolve(self.rt.pins, self.namespace, self.name, spec)
        if _key_from_config_map(resolution.spec):
            if not self._key_pending:
                self._key_pending = True  # a ConfigMap's key can change without the product changing
                self.sched.after(self, KEY_REFRESH_SECONDS, _Timer.KEY)
            self._reading = True
            self.rt.kube_pool.submit(self._read_product, resolution, uid, generation)
            return
        self._apply_product(_ProductRead(self._product_info(resolution, uid, generation)))

    def _read_product(self, resolution: Resolution, uid: str, generation: int) -> None:
        """In the kube pool: the product with its keys read from their ConfigMaps."""
        read = _ProductRead(None)
        try:
            read = _ProductRead(self._product_info(resolution, uid, generation))
        except Exception:
            log.exception("reading the keys of %s/%s failed", self.namespace, self.name)
        finally:
            self.sched.post(self, (0, read))

    def _product_info(self, resolution: Resolution, uid: str, generation: int) -> ProductInfo:
        spec = resolution.spec
        trusted = not self.rt.trusted_product_codes or spec.product_code in self.rt.trusted_product_codes
        public_key, key_error = self._load_key(spec)
        issuer_key = None
        license_source = spec.entitlement.license_manager
        if spec.entitlement.source is EntitlementSource.LICENSE_MANAGER and license_source is not None:
            # A contract product has no RegisterUsage key; the issuer's key (optional) verifies
            # its SignedTokens.
            public_key, key_error = None, None
            if license_source.issuer_public_key is not None:
                issuer_key, key_error = self._load_pem(license_source.issuer_public_key)
        return ProductInfo(
            namespace=self.namespace,
            name=self.name,
            uid=uid,
            generation=generation,
            spec=spec,
            trusted=trusted,
            public_key=public_key,
            key_error=key_error,
            resolution=resolution,
            issuer_key=issuer_key,
        )

    def _apply_product(self, read: _ProductRead) -> None:
        self._reading = False
        info = read.info
        if info is None:
            self._info_version = None  # the read failed: read again after a pause
            self.sched.after(self, LISTING_RETRY_SECONDS, RECOVER)
            return
        previous = self.state.info
        if previous is not None:
            # Unchanged keys: keep the objects, nothing to re-judge.
            if _same_key(previous.public_key, info.public_key):
                info = dataclasses.replace(info, public_key=previous.public_key)
            if _same_key(previous.issuer_key, info.issuer_key):
                info = dataclasses.replace(info, issuer_key=previous.issuer_key)
        if info.selector != self._watch_selector:
            self._resubscribe(info.spec.selector)
        if previous is None or info != previous:
            self.dispatch(m.ProductChanged(info))
        self._notice_hold()
        if self._reread:
            self._reread = False
            self._refresh_product()

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
            self._touch()

    def _notice_hold(self) -> None:
        """``spec.metering.onFailure``: the metering side says in ``MeteringHealthy`` whether usage
        could be reported; hold (or release) new pods when that verdict, under the effective spec's
        policy, changes. Only the operator (and cluster admins) can write the status subresource:
        the chart gives the buyers' roles read access to it, nothing more."""
        info = self.state.info
        hold = None
        if info is not None:
            healthy = get_condition((self._body().get("status") or {}).get("conditions"), onfailure.HEALTHY)
            hold = onfailure.hold_for(info.spec.metering.on_failure, info.mode, info.key, healthy)
        if hold != self.state.hold:
            log.warning(
                "%s/%s: onFailure hold %s", self.namespace, self.name, hold.reason if hold else "lifted"
            )
            self.dispatch(m.MeteringHold(hold))

    def _load_key(self, spec: MeteredProductSpec) -> tuple[RSAPublicKey | None, str | None]:
        source = spec.public_key
        if source is None:
            return (
                None,
                "no publicKey in the spec" if spec.entitlement.mode is not EntitlementMode.OFF else None,
            )
        return self._load_pem(source)

    def _load_pem(self, source: PublicKeySource) -> tuple[RSAPublicKey | None, str | None]:
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
    # pods: a subscription to the namespace's shared pod cache (its thread enqueues, we decide)

    def _resubscribe(self, selector: LabelSelector) -> None:
        old = self._subscription
        self._watch_token += 1
        self._watch_selector = to_query(selector)
        self._listing = None
        self._held = []
        listener = _PodListener(self.sched, self, self._watch_token)
        self._subscription = self.rt.pod_cache().subscribe(self.namespace, selector, listener)
        if old is not None:
            old.close()  # after subscribing anew: the namespace's watch is kept, not restarted

    def _unsubscribe(self) -> None:
        """Leave the namespace's cache now (the last subscriber leaving ends its watch at once)."""
        if self._subscription is not None:
            self._subscription.close()
            self._subscription = None

    def _take_listing(self, token: int, pods: tuple[m.Pod, ...]) -> None:
        """The product's pods as listed, to be decided with the operator's own denial record (a
        pod in it is never registered again), which the kube pool reads. Until it has been read,
        no other pod message of this subscription is taken (a denial must stay final)."""
        self._listing = (token, pods)
        self._load_denials()

    def _load_denials(self) -> None:
        if self._listing is not None and not self._denials_inflight:
            self._denials_inflight = True
            token, pods = self._listing
            self.rt.kube_pool.submit(self._read_denials, token, pods)

    def _read_denials(self, token: int, pods: tuple[m.Pod, ...]) -> None:
        """In the kube pool: the denial record, or None when it cannot be read (retried)."""
        denials: dict[str, str] | None = None
        try:
            denials = self.rt.records.load(self.namespace, self.name)
        except ApiException as exc:
            # E.g. 403 on the denial record: no pod is decided without it.
            log.error(
                "pod list for %s/%s: denial record unreadable: %s %s (ConfigMap %s/%s); retrying",
                self.namespace,
                self.name,
                exc.status,
                exc.reason,
                self.rt.records.namespace,
                record_name(self.namespace, self.name),
            )
        except Exception:
            log.exception("pod list for %s/%s: reading the denial record failed", self.namespace, self.name)
        finally:
            self.sched.post(self, (token, _Denials(pods, denials)))

    def _listed(self, token: int, answer: _Denials) -> None:
        self._denials_inflight = False
        if self._listing is None or self._listing[0] != token:
            self._load_denials()  # a newer subscription's listing waited for this read to end
            return
        if answer.denials is None:
            self.sched.after(self, LISTING_RETRY_SECONDS, _Timer.LISTING)
            return
        self._listing = None
        self.dispatch(m.Listed(answer.pods, answer.denials))
        held, self._held = self._held, []
        for message in held:
            self.dispatch(message)

    def _retry_listing(self) -> None:
        self._load_denials()

    # ------------------------------------------------------------------------------------------
    # status and workloads (coalesced, written from the kube pool)

    def _flush(self) -> None:
        if not self._dirty:
            return
        self._last_flush = self.sched.monotonic()
        self._dirty = False
        state = self.state
        for ref, members in machine.workload_members(state).items():
            annotations = ent.workload_annotations(members)
            if self._workloads_written.get(ref) != annotations:
                self._workloads_written[ref] = annotations
                self.rt.kube_pool.submit(self._annotate_workload, ref, annotations)
        if state.listed:
            self._write_status()

    def _annotate_workload(self, ref: WorkloadRef, annotations: dict[str, str]) -> None:
        try:
            self.rt.pods.annotate_workload(ref, annotations)
        except ApiException as exc:
            log.warning("cannot annotate %s %s/%s: %s", ref.kind, ref.namespace, ref.name, exc.reason)

    def _write_status(self) -> None:
        if self._status.inflight:
            self._dirty = True  # judged again once the write in flight has answered (_deliver)
            return
        state = self.state
        info = state.info
        view = GateView(ent.count_pods([]))
        if info is not None:
            view = GateView(
                counts=state.counts(),
                ungated=state.ungated(),
                last_denial=state.last_denial,
                last_error=state.last_error,
                registration=state.cluster.to_status() if state.cluster is not None else None,
                exhausted=state.exhausted(),
            )
            self._set_gauges(info, state)
        write = self._status.plan(self._body(), info, view, self.rt.clock.now())
        if write is not None:
            self._status.inflight = True
            self.rt.kube_pool.submit(self._apply_status, write)

    def _apply_status(self, write: StatusWrite) -> None:
        ok = False
        try:
            ok = self._status.apply(write)
        finally:
            self.sched.post(self, (-1, ok))

    def _set_gauges(self, info: ProductInfo, state: m.GateState) -> None:
        labels = (info.namespace, info.name, info.spec.product_code)
        for name, value in state.held().items():
            metrics.PODS_GATED.labels(*labels, name).set(value)
            self._gauge_states.add(name)
        if info.license is not None or state.seats:
            metrics.SEATS_HELD.labels(*labels).set(state.seats_held())
            self._seat_gauge = True

    def _clear_gauges(self) -> None:
        """The product is gone (or the operator stops): its series go with it, not stay stale."""
        info = self.state.info
        if info is None:
            return
        for name in self._gauge_states:
            with contextlib.suppress(KeyError):
                metrics.PODS_GATED.remove(info.namespace, info.name, info.spec.product_code, name)
        if self._seat_gauge:
            with contextlib.suppress(KeyError):
                metrics.SEATS_HELD.remove(info.namespace, info.name, info.spec.product_code)


def _key_from_config_map(spec: MeteredProductSpec) -> bool:
    license_source = spec.entitlement.license_manager
    sources = [spec.public_key, license_source.issuer_public_key if license_source else None]
    return any(source is not None and source.config_map_key_ref is not None for source in sources)


def _same_key(a: RSAPublicKey | None, b: RSAPublicKey | None) -> bool:
    return a is not None and b is not None and a is not b and a.public_numbers() == b.public_numbers()


@dataclass(frozen=True)
class _Listing:
    """The subscription's pods as first listed (made a ``Listed`` once the denial record is read)."""

    pods: tuple[m.Pod, ...]


@dataclass(frozen=True)
class _Denials:
    """The kube pool's answer: the denial record for a listing (None: unreadable, retried)."""

    pods: tuple[m.Pod, ...]
    denials: dict[str, str] | None


@dataclass(frozen=True)
class _ProductRead:
    """The product as judged (with keys read from ConfigMaps in the kube pool)."""

    info: ProductInfo | None


class _PodListener:
    """Called by the namespace's cache thread: only posts to the scheduler, tagged with the
    subscription (a post is a deque append; the scheduler takes a batch per wake-up)."""

    def __init__(self, scheduler: Scheduler, owner: ProductController, token: int) -> None:
        self._post = scheduler.post
        self._owner = owner
        self._token = token

    def listed(self, pods: list[CachedPod]) -> None:
        self._post(self._owner, (self._token, _Listing(tuple(p.gate for p in pods))))

    def updated(self, pod: CachedPod) -> None:
        self._post(self._owner, (self._token, m.PodUpdated(pod.gate)))

    def deleted(self, pod: CachedPod) -> None:
        self._post(self._owner, (self._token, m.PodDeleted(pod.uid)))
