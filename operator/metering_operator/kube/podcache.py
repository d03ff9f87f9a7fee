"""One shared, selector-indexed cache of pods per watched namespace, for the gate and metering.

Before, every MeteredProduct's gate ran its own filtered pod list + watch in a thread of its own,
and metering ran one more informer per distinct selector: with 50 products, about a hundred
watches of the same pods and as many copies of them. Here each namespace in use has exactly one
list + watch of *all* its pods (a label selector cannot express "any of 50 selectors"), in one
daemon thread, and keeps only:

* the pods that at least one registered selector selects -- every other pod is parsed from the
  raw JSON line (``json``, never the client's models), found unselected by the
  :class:`~metering_operator.domain.selector_index.SelectorIndex` and dropped at once, so a
  namespace with 10,000 pods no product selects costs no memory;
* of those, the compact :class:`~metering_operator.domain.cached_pod.CachedPod` (the gate's few
  fields and metering's ``PodView``), not the object.

Consumers :meth:`PodCache.subscribe` with (namespace, selector, listener): the listener gets
``listed`` (its selected pods, once, when the subscription is synced) and then ``updated`` /
``deleted`` as they happen -- the same stream a server-side filtered watch would give, including
``deleted`` when a pod's labels stop matching -- except that a watched change leaving the pod's gate
view (:attr:`CachedPod.gate`) as it was but for ``resourceVersion`` is not told (see below).
Listeners are called with the namespace's lock held, from its thread: they only enqueue (the gate's
controller) or nothing at all (metering reads :meth:`Subscription.snapshot` when it samples).

Changes the gate cannot act on stay in the cache. After the gate releases a pod, the scheduler binds
it and the kubelet (KWOK) marks it Running, Ready...: each a new version of the pod, each once an
``updated`` the gate's controller stepped through its state machine, for nothing -- its view of the
pod has no node, no conditions, no labels, and a phase only when final. The store (metering's
``PodView``) takes every version; a listener is told one only when
:func:`~metering_operator.domain.cached_pod.same_for_gate` says it differs from the one before.
Then the gate holds an older ``resourceVersion`` than the pod's: a write it guards with it (the
JSON-patch ``test`` of :mod:`metering_operator.domain.entitlement`) fails with a conflict and
:meth:`~metering_operator.kube.pods.PodApi.write_with_retry` re-reads the pod and decides again on
it, as for any change that raced the write. Its answer can be newer than the version the gate holds
and older than the last one watched, but every version between those two showed the gate the
same view, so taking it (``gate.machine._fresher``) changes nothing the gate decides on. Deletions,
a pod leaving a selector (``deleted``) or joining one (``updated`` for that selector's subscribers,
whatever else changed), and a full relist (which tells every pod whose version moved, so the gate's
versions are refreshed at least every :data:`RESYNC_SECONDS`) are told as before.

The loop: a paginated initial list (``limit``/``continue``), a watch with bookmarks resumed from
the last resourceVersion, a full relist on 410 Gone, on a watch error and every
:data:`RESYNC_SECONDS` (bounded: the watch's own timeout is cut to end then). A full relist is
diffed against the store, so existing subscribers see ordinary updates and deletions; only new
subscribers get ``listed``. The last subscriber of a namespace leaving stops its thread at once
(:class:`~metering_operator.kube.watch.WatchStream` cuts the blocked read short) and drops its pods.

A subscriber bringing a selector the namespace does not serve yet (50 products created at once used
to make 50 full relists, queued one after another per namespace):

* waits, with the others arriving together, until no new selector has come for
  :data:`COALESCE_SECONDS` (at most :data:`COALESCE_MAX_SECONDS`): they are served in one round;
* in a synced namespace, that round lists only the new selectors' pods: one request per selector
  with the API server's label selector (paginated), at exactly the store's resourceVersion
  (``resourceVersionMatch=Exact``), merged into the store; the watch then resumes from that same
  version. A namespace not synced yet, or whose version was compacted away (410), is listed whole;
* a full list serves every waiting subscriber whose selector was registered when it started -- each
  of its pages was filtered with it -- even if another selector came meanwhile; those that came
  during the list are served by the next round;
* a subscriber whose selector the namespace already serves (the same selector, synced) gets the
  store's current pods from memory at once, even while another selector waits.

Why this is consistent. The namespace is watched and listed by one thread, so while it lists, the
store holds exactly the state at ``self.version``: every event up to it applied, none after (a
paginated list is one snapshot too: each ``continue`` page is served at the first page's version).
A synced selector's members are its pods at that version, so a new subscriber of it gets what a
list of that selector at that version would return, then the same events as the others, in order
(both under the namespace's lock). A new selector's pods at that version are either in the store
(another selector keeps them: same state) or were dropped as unselected; the Exact list returns
them as of the same version, so the merged store is again one consistent state, nothing the others
see changes (they are not told anything), and resuming the watch from that version loses no event
and repeats none. A new selector's subscribers are told nothing until it is served: pods it selects
that a full list kept after it came (part of the pages) are never shown as its complete set.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Generator, Iterable
from typing import Any, Protocol

from kubernetes import client

from metering_operator.domain.cached_pod import CachedPod, compact, same_for_gate
from metering_operator.domain.product import LabelSelector
from metering_operator.domain.selector_index import SelectorIndex
from metering_operator.domain.selectors import to_query
from metering_operator.kube.watch import WatchExpired, WatchStream

log = logging.getLogger(__name__)

#: Server-side timeout of one watch request; the watch resumes from the last resourceVersion after.
WATCH_TIMEOUT_SECONDS = 240
#: A full relist at least this often, diffed against the store: repairs anything a watch missed.
RESYNC_SECONDS = 900.0
#: Pods per page of a list. Small: unselected pods are parsed a page at a time, so the page bounds
#: the transient memory of a relist of a namespace with 10,000 pods nobody selects.
PAGE_SIZE = 50
#: One page parsed at a time in the whole process: namespaces listing at once (the operator's
#: start) would otherwise each hold a parsed page, and the allocator keeps the peak as RSS. Only
#: the parsing is serialised; the requests of several namespaces' lists overlap.
_PAGE_LOCK = threading.Lock()
#: A new selector's list waits for this long a pause in new selectors, so that subscriptions
#: arriving together (products created at once, the operator's start) share one list...
COALESCE_SECONDS = 0.1
#: ... but never longer than this after the first of them came.
COALESCE_MAX_SECONDS = 0.5
SYNC_TIMEOUT_SECONDS = 30.0


#: Whom :meth:`_Namespace._changed` tells ``updated``.
_ALL, _JOINED, _NOBODY = "all", "joined", "nobody"


class NotSynced(RuntimeError):
    """The subscription's first list has not completed yet."""


class Listener(Protocol):
    """What a subscriber is told; called from the namespace's thread with its lock held: enqueue only.

    ``updated`` comes for a pod new to the selector and for a watched change of its gate view, not
    for one that only moved its ``resourceVersion`` (the module docstring says why that is safe)."""

    def listed(self, pods: list[CachedPod]) -> None: ...

    def updated(self, pod: CachedPod) -> None: ...

    def deleted(self, pod: CachedPod) -> None: ...


class Subscription:
    """One subscriber's (namespace, selector): its listener's stream and its snapshot."""

    def __init__(
        self, cache: PodCache, namespace: str, selector: LabelSelector, listener: Listener | None
    ) -> None:
        self.id = next(_ids)
        self.namespace = namespace
        self.selector = selector
        self.key = to_query(selector)
        self.listener = listener
        self.synced = threading.Event()
        self._cache = cache

    def snapshot(self, timeout: float = SYNC_TIMEOUT_SECONDS) -> list[CachedPod]:
        """The pods the selector selects now (waits for the first list)."""
        if not self.synced.wait(timeout):
            what = f"pods of {self.namespace} ({self.key or 'all'})"
            raise NotSynced(f"{what} not synced within {timeout:.0f}s")
        return self._cache._snapshot(self)

    def close(self) -> None:
        self._cache.unsubscribe(self)


_ids = itertools.count(1)


class _Selected:
    """One distinct selector of a namespace: its subscribers and the uids it selects."""

    def __init__(self, selector: LabelSelector, generation: int) -> None:
        self.selector = selector
        #: The namespace's generation that added it: a list started at this generation or later
        #: filtered every page with it.
        self.generation = generation
        self.subs: dict[int, Subscription] = {}
        self.members: set[str] = set()


class _Namespace:
    """The store, selectors and list + watch thread of one namespace."""

    def __init__(self, api: client.CoreV1Api, namespace: str, clock: Callable[[], float]) -> None:
        self.api = api
        self.namespace = namespace
        self._clock = clock
        self.lock = threading.Lock()
        self.store: dict[str, CachedPod] = {}
        self.selected: dict[str, _Selected] = {}
        self.index: SelectorIndex[str] = SelectorIndex()
        #: Subscribers waiting for their first ``listed``.
        self.pending: dict[int, Subscription] = {}
        #: Bumped when a selector is added: a list that started before does not serve it.
        self.generation = 0
        #: The generation at which the last completed list started: selectors up to it are synced.
        self.listed_generation = -1
        #: When the first selector still waiting for a list came, and the latest (coalescing).
        self.first_waiting_at: float | None = None
        self.last_added_at = 0.0
        self.version = ""
        self.listed_at = -1e18
        self.relists = 0
        #: Label-selector lists of new selectors' pods (a synced namespace gaining a selector).
        self.selector_lists = 0
        self.events = 0
        #: Watched changes of selected pods their subscribers were not told (gate view unchanged).
        self.unchanged = 0
        self._stream: WatchStream | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"pods-{namespace}", daemon=True)

    # -- subscribers (any thread) ------------------------------------------------------------
    def add(self, sub: Subscription) -> None:
        with self.lock:
            selected = self.selected.get(sub.key)
            if selected is None:
                self.generation += 1
                selected = self.selected[sub.key] = _Selected(sub.selector, self.generation)
                self.index.add(sub.key, sub.selector)
                self.last_added_at = self._clock()
                if self.first_waiting_at is None:
                    self.first_waiting_at = self.last_added_at
            selected.subs[sub.id] = sub
            if selected.generation <= self.listed_generation:
                # A selector the store already serves: synced from memory, no list (see the module
                # docstring for why that is the state at the cache's current resourceVersion).
                self._deliver_listed(sub, selected)
                return
            self.pending[sub.id] = sub
            stream = self._stream
        if stream is not None:
            stream.close()  # wake the watch: the loop relists for the new selector

    def remove(self, sub: Subscription) -> bool:
        """Drop ``sub``; True when the namespace has no subscriber left."""
        with self.lock:
            self.pending.pop(sub.id, None)
            selected = self.selected.get(sub.key)
            if selected is not None and selected.subs.pop(sub.id, None) is not None and not selected.subs:
                del self.selected[sub.key]
                self.index.remove(sub.key)
                for uid in selected.members:
                    pod = self.store.get(uid)
                    if pod is not None and not self.index.selects(pod.labels):
                        del self.store[uid]
            return not self.selected

    def snapshot(self, sub: Subscription) -> list[CachedPod]:
        with self.lock:
            selected = self.selected.get(sub.key)
            if selected is None:
                return []
            return [self.store[uid] for uid in selected.members]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.lock:
            stream = self._stream
            self.store.clear()
        if stream is not None:
            stream.close()

    # -- the loop (its own thread) ----------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._coalescing()
                if pause > 0:
                    self._stop.wait(pause)
                    continue
                need = self._needs()
                if need == "list":
                    self._list()
                    continue  # a selector may have come while listing
                if need == "selectors":
                    self._list_selectors()
                    continue
                self._watch()
            except WatchExpired:
                self.version = ""  # too old: list again
            except Exception as exc:  # network trouble, API server restart: back off and relist
                if self._stop.is_set():
                    return
                self.version = ""
                if isinstance(exc, client.ApiException) and exc.status == 410:
                    # A new selector's list at the store's version, compacted away: list all, now.
                    log.info("pod cache of %s: version gone; listing again", self.namespace)
                    continue
                log.warning("pod cache of %s: %s; listing again", self.namespace, exc)
                self._stop.wait(1.0)

    def _coalescing(self) -> float:
        """Seconds to wait before listing for new selectors, so that the ones arriving together share it."""
        with self.lock:
            if self.first_waiting_at is None or self.listed_generation == self.generation:
                return 0.0
            now = self._clock()
            until = min(self.last_added_at + COALESCE_SECONDS, self.first_waiting_at + COALESCE_MAX_SECONDS)
            return max(0.0, until - now)

    def _needs(self) -> str:
        """``list`` (all pods), ``selectors`` (only the pods of new selectors) or ``watch``."""
        with self.lock:
            if not self.version or self._clock() - self.listed_at >= RESYNC_SECONDS:
                return "list"
            if self.listed_generation != self.generation:
                return "selectors"
            return "watch"

    def _pages(self, every: dict[str, Any], first: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """The pages of one list of the namespace's pods, ``every`` page asked with those parameters
        and the ``first`` with these too (later ones follow its continue token, which pins them to
        its version). Each page is parsed and handed over under the process-wide page lock, so one
        page at a time is in memory whatever the namespaces; nothing more once the cache stops."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": PAGE_SIZE, "_preload_content": False, "_request_timeout": 60}
            kwargs.update(every)
            kwargs.update({"_continue": token} if token else first)
            response = self.api.list_namespaced_pod(self.namespace, **kwargs)
            raw = response.data
            response.release_conn()
            with _PAGE_LOCK:
                data = json.loads(raw)
                del raw, response
                if self._stop.is_set():
                    return
                token = (data.get("metadata") or {}).get("continue")
                yield data
                del data
            if not token:
                return

    def _list(self) -> None:
        with self.lock:
            generation = self.generation
            # Selectors coming from now on wait for the next list (and coalesce for it).
            self.first_waiting_at = None
        kept: dict[str, CachedPod] = {}
        meta: dict[str, Any] = {}
        # closing(): the page lock is let go at once even if a page raises.
        with contextlib.closing(self._pages({}, {})) as pages:
            for page in pages:
                with self.lock:
                    # Judged against the selectors of now: a page is dropped as it is read.
                    for item in page.get("items") or ():
                        labels = (item.get("metadata") or {}).get("labels")
                        if self.index.selects(labels):
                            pod = compact(item)
                            kept[pod.uid] = pod
                meta = page.get("metadata") or {}
                del page
        if self._stop.is_set():
            return
        with self.lock:
            self._replace(kept)
            self.version = str(meta.get("resourceVersion") or "")
            self.listed_at = self._clock()
            self.listed_generation = generation
            self.relists += 1
            # Every subscriber whose selector was there when the list started is served by it,
            # even if other selectors came meanwhile (their own pods are complete in ``kept``).
            for sub in list(self.pending.values()):
                selected = self.selected.get(sub.key)
                if selected is not None and selected.generation <= generation:
                    del self.pending[sub.id]
                    self._deliver_listed(sub, selected)

    def _list_selectors(self) -> None:
        """The pods of the selectors not served yet, each listed by the API server's label selector
        at exactly the store's resourceVersion and merged in (why that is consistent: the module
        docstring). A version compacted away raises 410: the loop lists the namespace whole."""
        with self.lock:
            generation = self.generation
            self.first_waiting_at = None
            version = self.version
            new = [
                key for key, selected in self.selected.items() if selected.generation > self.listed_generation
            ]
        found: dict[str, CachedPod] = {}
        for key in new:
            exact = {"resource_version": version, "resource_version_match": "Exact"}
            with contextlib.closing(self._pages({"label_selector": key}, exact)) as pages:
                for page in pages:
                    for item in page.get("items") or ():
                        pod = compact(item)
                        found[pod.uid] = pod
                    del page
            if self._stop.is_set():
                return
        with self.lock:
            for uid, pod in found.items():
                if not self.index.selects(pod.labels):
                    continue  # its selector left meanwhile
                old = self.store.get(uid)
                self.store[uid] = old if old is not None else pod
                # Same state at the same version: only memberships change; nobody synced is told.
                self._changed(old, self.store[uid], tell=_NOBODY)
            self.listed_generation = generation
            self.selector_lists += len(new)
            for sub in list(self.pending.values()):
                selected = self.selected.get(sub.key)
                if selected is not None and selected.generation <= generation:
                    del self.pending[sub.id]
                    self._deliver_listed(sub, selected)

    def _watch(self) -> None:
        stream = WatchStream()
        with self.lock:
            if self._stop.is_set() or self.listed_generation != self.generation:
                return
            self._stream = stream
            remaining = RESYNC_SECONDS - (self._clock() - self.listed_at)
        timeout = max(1, min(WATCH_TIMEOUT_SECONDS, int(remaining) + 1))
        try:
            for kind, obj in stream.events(
                self.api.list_namespaced_pod,
                timeout,
                namespace=self.namespace,
                resource_version=self.version,
            ):
                meta = obj.get("metadata") or {}
                self.version = str(meta.get("resourceVersion") or self.version)
                if kind == "BOOKMARK":
                    continue
                with self.lock:
                    self.events += 1
                    self._apply(kind, obj)
        finally:
            with self.lock:
                self._stream = None

    # -- the store (lock held) -----------------------------------------------------------------
    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid") or "")
        old = self.store.get(uid)
        if kind == "DELETED":
            if old is not None:
                del self.store[uid]
                self._changed(old, None)
            return
        if not self.index.selects(meta.get("labels")):
            if old is not None:
                del self.store[uid]
                self._changed(old, None)
            return  # nobody selects it: dropped without building anything
        pod = compact(obj)
        self.store[uid] = pod
        # Metering's view takes every version; a listener only a change of the gate's view (or the
        # pod joining its selector).
        if old is not None and same_for_gate(old, pod):
            self.unchanged += 1
            self._changed(old, pod, tell=_JOINED)
        else:
            self._changed(old, pod)

    def _replace(self, kept: dict[str, CachedPod]) -> None:
        """A relist: the new store, and what changed told to the subscribers already synced."""
        old_store = self.store
        self.store = kept
        for selected in self.selected.values():
            selected.members = set()
        for uid, pod in kept.items():
            old = old_store.get(uid)
            moved = old is None or old.resource_version != pod.resource_version
            self._changed(old, pod, tell=_ALL if moved else _NOBODY)
        for uid, old in old_store.items():
            if uid not in kept:
                self._changed(old, None)

    def _changed(self, old: CachedPod | None, new: CachedPod | None, tell: str = _ALL) -> None:
        """Memberships after ``old`` became ``new`` (None: gone); the selectors the pod left are
        told ``deleted``, and ``updated`` goes to every selector of ``new`` (``_ALL``), to those it
        joined (``_JOINED``) or to none (``_NOBODY``)."""
        before = self.index.matching(old.labels) if old is not None else set()
        after = self.index.matching(new.labels) if new is not None else set()
        uid = new.uid if new is not None else old.uid if old is not None else ""
        for key in before - after:
            selected = self.selected[key]
            selected.members.discard(uid)
            if old is not None:
                self._tell(selected.subs.values(), lambda listener: listener.deleted(old))
        for key in after:
            selected = self.selected[key]
            selected.members.add(uid)
            if new is not None and (tell == _ALL or (tell == _JOINED and key not in before)):
                self._tell(selected.subs.values(), lambda listener: listener.updated(new))

    def _tell(self, subs: Iterable[Subscription], call: Callable[[Listener], None]) -> None:
        for sub in subs:
            if sub.listener is not None and sub.id not in self.pending:
                call(sub.listener)

    def _deliver_listed(self, sub: Subscription, selected: _Selected) -> None:
        if sub.listener is not None:
            sub.listener.listed([self.store[uid] for uid in selected.members])
        sub.synced.set()


class PodCache:
    """The namespaces' caches: started with their first subscriber, stopped with their last."""

    def __init__(self, api: client.ApiClient, clock: Callable[[], float] = time.monotonic) -> None:
        self.core = client.CoreV1Api(api)
        self._clock = clock
        self._lock = threading.Lock()
        self._namespaces: dict[str, _Namespace] = {}

    def subscribe(
        self, namespace: str, selector: LabelSelector, listener: Listener | None = None
    ) -> Subscription:
        sub = Subscription(self, namespace, selector, listener)
        with self._lock:
            ns = self._namespaces.get(namespace)
            if ns is None:
                ns = self._namespaces[namespace] = _Namespace(self.core, namespace, self._clock)
                ns.add(sub)
                ns.start()  # after the first selector: its first list already keeps that one's pods
            else:
                ns.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            ns = self._namespaces.get(sub.namespace)
            if ns is not None and ns.remove(sub):
                del self._namespaces[sub.namespace]
                ns.stop()

    def _snapshot(self, sub: Subscription) -> list[CachedPod]:
        with self._lock:
            ns = self._namespaces.get(sub.namespace)
        return ns.snapshot(sub) if ns is not None else []

    def stop(self) -> None:
        with self._lock:
            namespaces = list(self._namespaces.values())
            self._namespaces.clear()
        for ns in namespaces:
            ns.stop()

    def threads(self) -> list[threading.Thread]:
        """The namespaces' list + watch threads (tests prove the last unsubscribe ends one)."""
        with self._lock:
            return [ns.thread for ns in self._namespaces.values()]

    def stats(self) -> dict[str, int]:
        with self._lock:
            namespaces = list(self._namespaces.values())
        return {
            "namespaces": len(namespaces),
            "selectors": sum(len(ns.selected) for ns in namespaces),
            "pods": sum(len(ns.store) for ns in namespaces),
            "events": sum(ns.events for ns in namespaces),
            "unchanged": sum(ns.unchanged for ns in namespaces),
            "relists": sum(ns.relists for ns in namespaces),
            "selector_lists": sum(ns.selector_lists for ns in namespaces),
        }
