"""Leader election with a coordination.k8s.io/v1 Lease: of all operator replicas only one meters.

AWS deduplicates MeterUsage per calling pod, so two replicas metering the same hour would both
be billed. The Lease protocol is the one client-go uses: the holder renews ``renewTime`` every
``duration / 3``; a candidate takes the Lease over only when it has seen no renewal for
``leaseDurationSeconds``. Every write is an update carrying the Lease's ``resourceVersion``, so
of two candidates racing for an expired Lease exactly one wins (the other gets 409 Conflict).

Expiry is judged on the local *monotonic* clock from when a change of the Lease record was
observed, as client-go's ``observedTime`` does -- never by comparing the holder's ``renewTime``
(the holder's wall clock) with this replica's wall clock: a replica whose clock runs 20 s fast
would take a live Lease. ``renewTime`` is written for people and other tools, not read here.
Likewise this replica leads until ``duration * 2/3`` of monotonic time after its last successful
renewal started, so it stops metering before anyone else may start.

The status writes' resourceVersion preconditions and per-attempt claims in the ledger are the
second line of defence if two processes ever overlap.

Each Lease read also reports the API server's ``Date`` (``on_server_time``): the metering clock
is bounded by it (:class:`~metering_operator.domain.clock.BoundedClock`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.kube.rawapi import RawApi, segment

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _micro_time(when: datetime) -> str:
    # metav1.MicroTime: RFC 3339 with microseconds.
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    text = str(value).replace("Z", "+00:00")
    return datetime.fromisoformat(text)


class LeaseElector:
    """Acquire and renew one Lease; ``is_leader`` says whether this process may meter now."""

    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        name: str,
        identity: str,
        duration_seconds: float = 15.0,
        now: Callable[[], datetime] = _now,
        monotonic: Callable[[], float] = time.monotonic,
        on_server_time: Callable[[datetime, float], None] | None = None,
        on_round: Callable[[str], None] | None = None,
    ) -> None:
        if not identity:
            raise ValueError("a leader election identity is required")
        if duration_seconds <= 0:
            raise ValueError("lease duration must be positive")
        # Raw JSON (kube/rawapi.py): a read and a write every few seconds for the process's
        # life; through the generated API's Lease model they were most of the idle CPU.
        self.raw = RawApi(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = timedelta(seconds=duration_seconds)
        self._now = now
        self._monotonic = monotonic
        self._on_server_time = on_server_time
        #: Told each round's outcome: "led" (acquired or renewed), "deferred" (another holder's
        #: renewal is still live), "lost" (another replica wrote first) or "error".
        self._on_round = on_round or (lambda _outcome: None)
        self._lock = threading.Lock()
        # Monotonic deadlines, never wall-clock times.
        self._leading_until: float | None = None
        # The Lease record as last read, and the monotonic time it was first seen so.
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._logged_holder: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0

    # -- state ------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        with self._lock:
            return self._leading_until is not None and self._monotonic() < self._leading_until

    def _set_leading(self, until: float | None) -> None:
        with self._lock:
            was = self._leading_until is not None and self._monotonic() < self._leading_until
            self._leading_until = until
            now_leading = until is not None and self._monotonic() < until
        if was != now_leading:
            self.transitions += 1
            log.info(
                "leader election: %s %s lease %s/%s",
                self.identity,
                "acquired" if now_leading else "lost",
                self.namespace,
                self.name,
            )

    # -- one round of the protocol ------------------------------------------------------------
    @property
    def _path(self) -> str:
        return (
            f"/apis/coordination.k8s.io/v1/namespaces/{segment(self.namespace)}/leases/{segment(self.name)}"
        )

    def _read(self) -> dict[str, Any]:
        try:
            payload, headers = self.raw.exchange("GET", self._path)
        except ApiException as exc:
            self._server_time(exc.headers)  # a 404 is an answer with a Date too
            raise
        self._server_time(headers)
        lease: dict[str, Any] = json.loads(payload)
        return lease

    def _server_time(self, headers: Any) -> None:
        received = self._monotonic()
        date = (headers or {}).get("Date") or (headers or {}).get("date")
        if date and self._on_server_time is not None:
            try:
                self._on_server_time(parsedate_to_datetime(date), received)
            except (TypeError, ValueError):
                log.debug("leader election: unparsable Date header %r", date)

    def observed_expired(self, record: tuple[Any, ...], seconds: float) -> bool:
        """Whether ``record`` (holder, renewTime, ...) has not changed for ``seconds`` of monotonic time."""
        mono = self._monotonic()
        if record != self._observed:
            self._observed = record
            self._observed_at = mono
        return mono >= self._observed_at + seconds

    def try_acquire_or_renew(self) -> bool:
        """One attempt; returns whether this process leads afterwards."""
        started = self._monotonic()
        now = self._now()
        try:
            lease = self._read()
        except ApiException as exc:
            if exc.status != 404:
                log.warning("leader election: cannot read lease: %s", exc.reason)
                self._expire_if_stale()
                self._on_round("error")
                return self.is_leader()
            return self._create(now, started)
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        renewed = spec.get("renewTime")
        seconds = float(spec.get("leaseDurationSeconds") or self.duration.total_seconds())
        record = (holder, str(renewed), spec.get("acquireTime"), spec.get("leaseTransitions"))
        expired = self.observed_expired(record, seconds)
        held_by_other = bool(holder) and holder != self.identity and renewed is not None
        if held_by_other and not expired:
            if holder != self._logged_holder:
                self._logged_holder = holder
                log.info(
                    "leader election: lease %s/%s is held by %s; taken over only after %.0f s without "
                    "a renewal observed (local monotonic clock)",
                    self.namespace,
                    self.name,
                    holder,
                    seconds,
                )
            self._set_leading(None)
            self._on_round("deferred")
            return False
        self._logged_holder = None
        transitions = int(spec.get("leaseTransitions") or 0)
        acquired = _parse_time(spec.get("acquireTime")) if holder == self.identity else None
        if holder != self.identity:
            transitions += 1
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": (lease.get("metadata") or {}).get("resourceVersion"),
            },
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration.total_seconds())),
                "acquireTime": _micro_time(acquired or now),
                "renewTime": _micro_time(now),
                "leaseTransitions": transitions,
            },
        }
        try:
            self.raw.exchange("PUT", self._path, body)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first: they won this round
                self._set_leading(None)
                self._on_round("lost")
                return False
            log.warning("leader election: cannot update lease: %s", exc.reason)
            self._expire_if_stale()
            self._on_round("error")
            return self.is_leader()
        # Lead a little less long than the lease says, counted from before the read, so we
        # stop before anyone may start (they count a full duration from after our write).
        self._set_leading(started + self.duration.total_seconds() * 2 / 3)
        self._on_round("led")
        return True

    def _create(self, now: datetime, started: float) -> bool:
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration.total_seconds())),
                "acquireTime": _micro_time(now),
                "renewTime": _micro_time(now),
                "leaseTransitions": 0,
            },
        }
        try:
            self.raw.exchange(
                "POST", f"/apis/coordination.k8s.io/v1/namespaces/{segment(self.namespace)}/leases", body
            )
        except ApiException as exc:
            if exc.status != 409:
                log.warning("leader election: cannot create lease: %s", exc.reason)
            self._set_leading(None)
            self._on_round("lost" if exc.status == 409 else "error")
            return False
        self._set_leading(started + self.duration.total_seconds() * 2 / 3)
        self._on_round("led")
        return True

    def _expire_if_stale(self) -> None:
        if not self.is_leader():
            self._set_leading(None)

    # -- background loop ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lease-elector", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        period = self.duration.total_seconds() / 3
        while not self._stop.is_set():
            try:
                self.try_acquire_or_renew()
            except Exception:  # the loop must survive anything; leadership then lapses by itself
                log.exception("leader election round failed")
                self._on_round("error")
            self._stop.wait(period if self.is_leader() else period / 2)

    def stop(self, release: bool = True) -> None:
        """Stop renewing; optionally release the Lease so a successor need not wait it out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release and self.is_leader():
            self._set_leading(None)
            try:
                lease = json.loads(self.raw.exchange("GET", self._path)[0])
                spec = lease.get("spec") or {}
                if spec.get("holderIdentity") == self.identity:
                    spec.pop("renewTime", None)
                    spec.pop("holderIdentity", None)
                    self.raw.exchange("PUT", self._path, lease)
            except ApiException as exc:
                log.warning("leader election: cannot release lease: %s", exc.reason)

    def wait_for_leadership(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_leader():
                return True
            time.sleep(0.05)
        return self.is_leader()
