"""Leader election with a coordination.k8s.io/v1 Lease: of all operator replicas only one meters.

AWS deduplicates MeterUsage per calling pod, so two replicas metering the same hour would both
be billed. The Lease protocol is the one client-go uses: the holder renews ``renewTime`` every
``duration / 3``; a candidate takes the Lease over only when ``renewTime + leaseDurationSeconds``
has passed. Every write is an update carrying the Lease's ``resourceVersion``, so of two
candidates racing for an expired Lease exactly one wins (the other gets 409 Conflict).

A leader that cannot renew steps down by itself once its own view of the Lease has expired, so
it stops metering before anyone else may start (renewal deadline < lease duration). The status
writes' resourceVersion preconditions and per-attempt claims in the ledger are the second line
of defence if two processes ever overlap.

Time here is the local monotonic/system clock on purpose, not the (possibly emulated) metering
clock: lease expiry is about processes being alive, and every replica must agree on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

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
    ) -> None:
        if not identity:
            raise ValueError("a leader election identity is required")
        if duration_seconds <= 0:
            raise ValueError("lease duration must be positive")
        self.coordination = client.CoordinationV1Api(api)
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = timedelta(seconds=duration_seconds)
        self._now = now
        self._lock = threading.Lock()
        self._leading_until: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.transitions = 0

    # -- state ------------------------------------------------------------------------------
    def is_leader(self) -> bool:
        with self._lock:
            return self._leading_until is not None and self._now() < self._leading_until

    def _set_leading(self, until: datetime | None) -> None:
        with self._lock:
            was = self._leading_until is not None and self._now() < self._leading_until
            self._leading_until = until
            now_leading = until is not None and self._now() < until
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
    def try_acquire_or_renew(self) -> bool:
        """One attempt; returns whether this process leads afterwards."""
        now = self._now()
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                log.warning("leader election: cannot read lease: %s", exc.reason)
                self._expire_if_stale()
                return self.is_leader()
            return self._create(now)
        spec = lease.spec
        holder = spec.holder_identity if spec else None
        renewed = _parse_time(spec.renew_time) if spec else None
        seconds = (spec.lease_duration_seconds if spec else None) or self.duration.total_seconds()
        held_by_other = holder and holder != self.identity and renewed is not None
        if held_by_other and renewed is not None and now < renewed + timedelta(seconds=seconds):
            self._set_leading(None)
            return False
        transitions = (spec.lease_transitions or 0) if spec else 0
        acquired = _parse_time(spec.acquire_time) if spec and holder == self.identity else None
        if holder != self.identity:
            transitions += 1
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
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
            self.coordination.replace_namespaced_lease(self.name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 409:  # someone else wrote first: they won this round
                self._set_leading(None)
                return False
            log.warning("leader election: cannot update lease: %s", exc.reason)
            self._expire_if_stale()
            return self.is_leader()
        # Lead a little less long than the lease says, so we stop before anyone may start.
        self._set_leading(now + self.duration * 2 / 3)
        return True

    def _create(self, now: datetime) -> bool:
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
            self.coordination.create_namespaced_lease(self.namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                log.warning("leader election: cannot create lease: %s", exc.reason)
            self._set_leading(None)
            return False
        self._set_leading(now + self.duration * 2 / 3)
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
            self._stop.wait(period if self.is_leader() else period / 2)

    def stop(self, release: bool = True) -> None:
        """Stop renewing; optionally release the Lease so a successor need not wait it out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if release and self.is_leader():
            self._set_leading(None)
            try:
                lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
                if lease.spec and lease.spec.holder_identity == self.identity:
                    lease.spec.renew_time = None
                    lease.spec.holder_identity = None
                    self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
            except ApiException as exc:
                log.warning("leader election: cannot release lease: %s", exc.reason)

    def wait_for_leadership(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_leader():
                return True
            time.sleep(0.05)
        return self.is_leader()
