"""What every product's metering cycle shares: clients, the clock, the journal, settings.

Built once by ``metering-operator run`` (:func:`build_runtime`) and handed to the kopf handlers
through ``memo.metering_runtime``; nothing here is a module-level global.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime

from metering_operator import metrics
from metering_operator.aws.client import MeteringClient, client_config
from metering_operator.domain import ledger, permission
from metering_operator.domain.clock import BoundedClock, Clock, ReferenceClock
from metering_operator.kube.apiclient import new_api_client
from metering_operator.kube.events import EventPoster
from metering_operator.kube.journal import JournalStore
from metering_operator.kube.leader import LeaseElector
from metering_operator.kube.observed import ObservedIndex
from metering_operator.kube.podcache import PodCache
from metering_operator.kube.status import StatusStore
from metering_operator.metering.journal import Journal
from metering_operator.metering.plan import metering_owners
from metering_operator.settings import OperatorSettings

log = logging.getLogger(__name__)

OWNERS_REFRESH_SECONDS = 30.0
#: Products' sampling cycles running at once (each is blocking Kubernetes and AWS calls); the
#: scheduler submits a product's cycle when it is due, never two of one product at once.
CYCLE_WORKERS = 4


@dataclass
class MeteringRuntime:
    settings: OperatorSettings
    clock: Clock
    store: StatusStore
    index: ObservedIndex
    elector: LeaseElector
    aws: MeteringClient
    events: EventPoster
    journal: Journal
    policy: ledger.Policy
    last_write: dict[str, float] = field(default_factory=dict)
    #: Per product: what the last repair found, and the hour it happened in (the condition says
    #: StatusRepaired for the rest of that hour).
    repairs: dict[str, tuple[str, datetime]] = field(default_factory=dict)
    #: Per product: the DryRun permission check's state (in memory: a new leader checks again).
    permissions: dict[str, permission.PermissionState] = field(default_factory=dict)
    check_policy: permission.CheckPolicy = field(default_factory=permission.CheckPolicy)
    cycles: int = 0
    cycle_pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=CYCLE_WORKERS, thread_name_prefix="metering")
    )
    _owners: dict[str, tuple[str, str]] = field(default_factory=dict)
    _owners_read: float = -1e9
    _bounded: bool = False

    def owner_of(self, product_code: str) -> tuple[str, str] | None:
        """Which MeteredProduct meters ``product_code`` (see :func:`.plan.metering_owners`)."""
        stale = time.monotonic() - self._owners_read > OWNERS_REFRESH_SECONDS
        if stale or product_code not in self._owners:
            self._owners = metering_owners(
                self.store.list_products(self.settings.namespaces), self.settings.pins
            )
            self._owners_read = time.monotonic()
        return self._owners.get(product_code)

    def now(self) -> datetime:
        now = self.clock.now()
        if isinstance(self.clock, BoundedClock):
            metrics.CLOCK_SKEW.set(self.clock.skew.total_seconds())
            if self.clock.bounded != self._bounded:
                self._bounded = self.clock.bounded
                if self._bounded:
                    log.warning(
                        "the local clock is %.1f s off the API server's: using the API server's time",
                        self.clock.skew.total_seconds(),
                    )
                else:
                    log.info("the local clock agrees with the API server's again")
        return now

    def release(self, namespace: str, name: str) -> None:
        """The product was deleted or stopped metering: drop its informers, gauges and state."""
        key = f"{namespace}/{name}"
        self.index.release(key)
        self.last_write.pop(key, None)
        self.repairs.pop(key, None)
        self.permissions.pop(key, None)
        self.journal.forget(namespace, name)
        for state in ledger.LedgerState:
            metrics.LEDGER_ENTRIES.remove(namespace, name, state.value)  # absent labels: no-op
        metrics.remove_product_series(namespace, name)

    def stop(self) -> None:
        self.elector.stop(True)
        self.cycle_pool.shutdown(wait=False)


def build_runtime(
    settings: OperatorSettings,
    clock: Clock,
    *,
    wall: Clock | None = None,
    reference: ReferenceClock | None = None,
    cache: PodCache | None = None,
) -> MeteringRuntime:
    """The runtime. ``wall`` is the local wall clock (the Lease's renewTime is written with it);
    ``reference``, when the API server's clock bounds ``clock``, is fed by the Lease reads;
    ``cache`` is the namespaces' pod cache the gate shares (its own when not given)."""
    api = new_api_client(pool_size=32)
    elector = LeaseElector(
        api,
        settings.operator_namespace,
        settings.lease_name,
        settings.operator_identity or f"{os.uname().nodename}-{os.getpid()}",
        settings.lease_duration_seconds,
        now=(wall or clock).now,
        on_server_time=reference.observe if reference is not None else None,
        on_round=lambda outcome: metrics.LEASE_ROUNDS.labels(outcome=outcome).inc(),
    )
    metrics.LEADER.set_function(lambda: 1.0 if elector.is_leader() else 0.0)
    elector.start()
    config = client_config(
        connect_timeout=settings.aws_connect_timeout_seconds, read_timeout=settings.aws_read_timeout_seconds
    )
    return MeteringRuntime(
        settings=settings,
        clock=clock,
        store=StatusStore(api),
        index=ObservedIndex(api, cache),
        elector=elector,
        aws=MeteringClient.create(settings.region, config=config),
        events=EventPoster(api),
        journal=Journal(JournalStore(api, settings.operator_namespace)),
        policy=ledger.Policy(history=settings.ledger_history),
    )
