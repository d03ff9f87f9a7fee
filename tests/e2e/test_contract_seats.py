"""Contract products end to end: License Manager floating seats through the entitlement gate.

The operator is a real process, the API server real (with a scheduler and KWOK nodes), AWS the
emulator (its License Manager, with the settable clock the operator follows through
``--emulator-clock-url``). Judged from the API server (pods, annotations, Events, status) and from
the emulator (its seat view, its checkouts and its CloudTrail-style event log).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client

from metering_operator.aws.license_models import MARKETPLACE_KEY_FINGERPRINT
from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_SIGNATURE,
    GROUP,
    PLURAL,
    VERSION,
    MeteringStatus,
)
from metering_operator.kube.seat_records import SeatRecords
from tests.e2e.conftest import (
    BUYER_ACCOUNT,
    BUYER_ROLE,
    PRODUCT_CODE,
    OperatorFactory,
    OperatorProcess,
    emulator_config,
    wait_for,
)
from tests.e2e.test_entitlement import (
    REASON,
    condition,
    gated,
    notes,
    pod_events,
    pods,
    read_product,
    service_account,
    wait_product_ready,
)
from tests.emulator.harness import EmulatorProcess, start_emulator

pytestmark = pytest.mark.cluster

LICENSE_ARN = f"arn:aws:license-manager::{BUYER_ACCOUNT}:license:l-contractseats0001"
SKU = "prod-contractseats01"
APP = "contract"


CONTRACT = {
    "licenseArn": LICENSE_ARN,
    "productSKU": SKU,
    "buyerAccount": BUYER_ACCOUNT,
    "entitlements": [
        {"name": "seats", "unit": "Count", "maxCount": 3},
        {"name": "site", "unit": "None"},
    ],
}
#: The operator's own identity for MeterUsage (contract with consumption): an IAM user of the buyer.
OPERATOR_KEY = ("AKIACONTRACTOPERATOR01", "contract-operator-secret")


@pytest.fixture
def contract_emulator(cluster: ClusterInfo, tmp_path: Path) -> Iterator[EmulatorProcess]:
    """The buyer's emulator with one contract (3 floating seats of ``seats``), and the product's
    ``users`` dimension for the pay-as-you-go part of a contract with consumption."""
    config = emulator_config(
        cluster,
        licenses=[CONTRACT],
        products=[
            {
                "productCode": PRODUCT_CODE,
                "dimensions": [{"name": "users"}],
                "entitledAccounts": [BUYER_ACCOUNT],
            }
        ],
        staticCredentials=[
            {
                "accessKeyId": OPERATOR_KEY[0],
                "secretAccessKey": OPERATOR_KEY[1],
                "arn": f"arn:aws:iam::{BUYER_ACCOUNT}:user/metering-operator",
            }
        ],
    )
    emulator = start_emulator(config, tmp_path / "emulator")
    try:
        yield emulator
    finally:
        emulator.stop()


@dataclass
class Contract:
    kube: client.ApiClient
    namespace: str
    operator: OperatorFactory
    emulator: EmulatorProcess

    def product(
        self,
        entitlements: list[dict[str, Any]] | None = None,
        checkout_type: str | None = None,
        **spec: Any,
    ) -> None:
        service_account(self.kube, self.namespace, "buyer", BUYER_ROLE)
        issuer_pem = self.emulator.admin.license_issuer_key_pem(MARKETPLACE_KEY_FINGERPRINT)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": APP},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "selector": {"matchLabels": {"app": APP}},
                "entitlement": {
                    "mode": "Enforce",
                    "source": "LicenseManager",
                    "licenseManager": {
                        "productSKU": SKU,
                        "entitlements": entitlements or [{"name": "seats", "perPod": 1}],
                        "issuerPublicKey": {"pem": issuer_pem},
                        **({"checkoutType": checkout_type} if checkout_type else {}),
                    },
                },
                **spec,
            },
        }
        client.CustomObjectsApi(self.kube).create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )

    def start(self, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> OperatorProcess:
        op = self.operator(
            self.namespace,
            self.emulator,
            extra_env=env,
            extra_args=[
                "--trusted-product-code",
                PRODUCT_CODE,
                "--emulator-clock-url",
                self.emulator.url,
                *extra_args,
            ],
        )
        wait_product_ready(self.kube, self.namespace, APP)
        return op

    def deployment(self, replicas: int) -> None:
        client.AppsV1Api(self.kube).create_namespaced_deployment(
            self.namespace,
            {
                "metadata": {"name": APP},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": {"app": APP}},
                    "template": {
                        "metadata": {"labels": {"app": APP}},
                        "spec": {
                            "serviceAccountName": "buyer",
                            "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
                        },
                    },
                },
            },
        )

    def scale(self, replicas: int) -> None:
        client.AppsV1Api(self.kube).patch_namespaced_deployment_scale(
            APP, self.namespace, {"spec": {"replicas": replicas}}
        )

    def live_pods(self) -> list[dict[str, Any]]:
        return [p for p in pods(self.kube, self.namespace, APP) if not p["metadata"].get("deletionTimestamp")]

    def split(self, granted: int, waiting: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
        """(granted pods, pods waiting for a seat) once exactly that many of each exist."""
        current = self.live_pods()
        done = [p for p in current if notes(p).get(ANNOTATION_ENTITLEMENT) == "Granted" and not gated(p)]
        wait = [p for p in current if gated(p) and notes(p).get(REASON, "").startswith("SeatsExhausted")]
        if len(current) == granted + waiting and len(done) == granted and len(wait) == waiting:
            return done, wait
        return None

    def wait_split(self, granted: int, waiting: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        result: tuple[list[dict[str, Any]], list[dict[str, Any]]] = wait_for(
            f"{granted} granted and {waiting} waiting pods", lambda: self.split(granted, waiting)
        )
        return result

    def seats_in_use(self) -> int:
        usage = self.emulator.admin.seat_usage(LICENSE_ARN)
        return int(float(usage[0]["entitlements"][0]["inUse"]))

    def active_holders(self) -> set[str]:
        """The pod uids (NodeId) of the per-pod checkouts active in the emulator now."""
        return {
            c["nodeId"]
            for c in self.emulator.admin.license_checkouts(LICENSE_ARN)
            if c["state"] == "Active" and not c["nodeId"].startswith("cluster-")
        }

    def calls(self, operation: str, error_code: str | None = None) -> int:
        return len(self.emulator.admin.events(operation=operation, error_code=error_code))

    def successful(self, operation: str) -> int:
        return sum(1 for e in self.emulator.admin.events(operation=operation) if not e.get("errorCode"))


@pytest.fixture
def contract(
    kube: client.ApiClient, namespace: str, operator: OperatorFactory, contract_emulator: EmulatorProcess
) -> Contract:
    return Contract(kube, namespace, operator, contract_emulator)


def denied_event(contract: Contract, name: str) -> bool:
    return "EntitlementDenied" in {e.reason for e in pod_events(contract.kube, contract.namespace, name)}


def uids(items: list[dict[str, Any]]) -> set[str]:
    return {p["metadata"]["uid"] for p in items}


# --- seats ---------------------------------------------------------------------------------------------


def test_three_seats_four_replicas_waiting_pod_gets_a_freed_seat_and_scale_down_checks_in(
    contract: Contract,
) -> None:
    contract.product()
    op = contract.start()
    contract.deployment(replicas=4)

    granted, waiting = contract.wait_split(3, 1)
    waiter = waiting[0]
    # Each granted pod holds exactly one seat, checked out with its own identity (NodeId = its uid).
    assert contract.active_holders() == uids(granted)
    assert contract.seats_in_use() == 3
    for pod in granted:
        assert notes(pod)[ANNOTATION_SIGNATURE].count(".") == 2  # the SignedToken, a JWS
    checkouts = {c["nodeId"]: c for c in contract.emulator.admin.license_checkouts(LICENSE_ARN)}
    for pod in granted:
        assert checkouts[pod["metadata"]["uid"]]["podUid"] == pod["metadata"]["uid"]
    # The fourth waits behind the gate with a reason, an Event and the product's condition.
    assert waiter["status"].get("phase") == "Pending"
    wait_for(
        "the SeatsExhausted Event",
        lambda: (
            "SeatsExhausted"
            in {e.reason for e in pod_events(contract.kube, contract.namespace, waiter["metadata"]["name"])}
        ),
    )
    status = wait_for(
        "Entitled=False SeatsExhausted",
        lambda: (
            (p := read_product(contract.kube, contract.namespace, APP))
            and condition(p, "Entitled").get("reason") == "SeatsExhausted"
            and (p.get("status") or {}).get("pods") == {"registered": 3, "pending": 1, "denied": 0}
            and p
        ),
    )
    assert condition(status, "Entitled")["status"] == "False"
    assert condition(status, "Ready")["status"] == "True"

    # A seat frees (one granted pod goes away): it is checked in, and the pod that waited longest
    # gets it -- not the Deployment's replacement pod, which now waits in its turn.
    checkins = contract.successful("CheckInLicense")
    victim = sorted(granted, key=lambda p: p["metadata"]["name"])[0]
    client.CoreV1Api(contract.kube).delete_namespaced_pod(
        victim["metadata"]["name"], contract.namespace, grace_period_seconds=0
    )
    granted, waiting = contract.wait_split(3, 1)
    assert waiter["metadata"]["uid"] in uids(granted)
    assert victim["metadata"]["uid"] not in uids(granted)
    assert contract.successful("CheckInLicense") == checkins + 1
    assert contract.active_holders() == uids(granted)
    assert contract.seats_in_use() == 3

    # Scale-down: the ReplicaSet removes the unscheduled (waiting) pod and one running pod; the
    # running pod's seat is checked in, so seats in use go down. (Once the granted pods run: a pod
    # released a moment ago may not be scheduled yet, and would go first.)
    wait_for(
        "the granted pods to run",
        lambda: all(
            p["status"].get("phase") == "Running"
            for p in contract.live_pods()
            if p["metadata"]["uid"] in uids(granted)
        ),
    )
    contract.scale(2)
    granted, _ = contract.wait_split(2, 0)
    wait_for("2 seats in use", lambda: contract.seats_in_use() == 2)
    assert contract.active_holders() == uids(granted)
    assert contract.successful("CheckInLicense") == checkins + 2
    metrics = op.metrics()
    assert "marketplace_metering_license_seats_held" in metrics
    # The operator's own record holds exactly the live checkouts.
    records = SeatRecords(contract.kube, "default").load(contract.namespace, APP)
    assert {h for h, s in records.items() if s.lease is not None} >= uids(granted)


def test_sigkilled_operator_leaks_no_seat_past_the_lease_and_restarts_without_double_holding(
    contract: Contract,
) -> None:
    contract.product()
    op = contract.start()
    contract.deployment(replicas=4)
    granted, _ = contract.wait_split(3, 1)
    running = uids(granted)

    # Crash; the seats stay held at AWS for their lease (60 minutes), not longer.
    op.kill()
    contract.emulator.admin.advance_clock(30 * 60)
    assert contract.seats_in_use() == 3
    contract.emulator.admin.advance_clock(31 * 60)
    assert contract.seats_in_use() == 0

    # Restart: the pods that were running get their seats back first (the waiting pod still
    # waits), and nothing is held twice.
    successes = contract.successful("CheckoutLicense")
    op = op.restart()
    wait_for("the running pods to hold seats again", lambda: contract.active_holders() == running)
    granted, _ = contract.wait_split(3, 1)
    assert uids(granted) == running
    assert contract.seats_in_use() == 3
    assert contract.successful("CheckoutLicense") == successes + 3

    # Crash again, this time for 45 minutes: the leases are still live (15 minutes left). The
    # restarted operator proves the pods from its own record and extends those leases instead of
    # checking out again.
    extends = contract.successful("ExtendLicenseConsumption")
    successes = contract.successful("CheckoutLicense")
    op.kill()
    contract.emulator.admin.advance_clock(45 * 60)
    assert contract.seats_in_use() == 3
    op = op.restart()
    wait_for("3 leases extended", lambda: contract.successful("ExtendLicenseConsumption") >= extends + 3)
    granted, _ = contract.wait_split(3, 1)
    assert uids(granted) == running
    assert contract.successful("CheckoutLicense") == successes
    assert contract.seats_in_use() == 3
    # Past the old expiry the extended leases still hold their seats.
    contract.emulator.admin.advance_clock(20 * 60)
    assert contract.seats_in_use() == 3
    assert contract.active_holders() == running


# --- final denial and retries ---------------------------------------------------------------------------


def test_an_entitlement_the_license_lacks_is_a_final_denial(contract: Contract) -> None:
    contract.product(entitlements=[{"name": "gpus", "perPod": 1}])
    contract.start()
    contract.deployment(replicas=2)

    denied = wait_for(
        "2 denied pods",
        lambda: (
            (ps := contract.live_pods())
            and len(ps) == 2
            and all(notes(p).get(ANNOTATION_ENTITLEMENT) == "Denied" for p in ps)
            and ps
        ),
    )
    for pod in denied:
        assert gated(pod)
        assert notes(pod)[REASON].startswith("NoEntitlementsAllowed"), notes(pod)[REASON]
        assert "gpus" in notes(pod)[REASON]
        wait_for(  # posted right after the annotation is written
            f"the EntitlementDenied Event of {pod['metadata']['name']}",
            partial(denied_event, contract, str(pod["metadata"]["name"])),
        )
    status = wait_for(
        "Entitled=False for 2 denied pods",
        lambda: (
            (p := read_product(contract.kube, contract.namespace, APP))["status"]
            .get("pods", {})
            .get("denied")
            == 2
            and p
        ),
    )
    assert condition(status, "Entitled")["status"] == "False"
    assert condition(status, "Ready")["reason"] == "AllPodsDenied"
    # Final: never asked again, even as the emulator's clock (and every timer of the operator)
    # moves on by hours. A third pod, denied with one call of its own, proves the operator was
    # looking meanwhile: three pods, three CheckoutLicense calls in all.
    assert contract.calls("CheckoutLicense") == 2
    contract.emulator.admin.advance_clock(3 * 3600)
    contract.scale(3)
    wait_for(
        "3 denied pods",
        lambda: (
            len(ps := contract.live_pods()) == 3
            and all(notes(p).get(ANNOTATION_ENTITLEMENT) == "Denied" for p in ps)
        ),
    )
    assert contract.calls("CheckoutLicense") == 3
    assert contract.seats_in_use() == 0


def test_throttled_checkouts_are_retried_until_every_pod_holds_its_seat(contract: Contract) -> None:
    contract.product()
    contract.emulator.admin.set_fault("CheckoutLicense", fail_with="RateLimitExceededException")
    op = contract.start()
    contract.deployment(replicas=3)

    # Throttled: every pod waits behind its gate (Pending, with the reason) and is retried ...
    wait_for(
        "each pod throttled twice",
        lambda: contract.calls("CheckoutLicense", error_code="RateLimitExceededException") >= 6,
    )
    for pod in contract.live_pods():
        assert gated(pod)
        assert notes(pod).get(ANNOTATION_ENTITLEMENT) == "Pending"
        assert notes(pod).get(REASON, "").startswith("RateLimitExceededException")
    assert contract.seats_in_use() == 0
    # ... on the backoff, until License Manager answers: then each pod holds exactly one seat.
    contract.emulator.admin.clear_faults()
    granted, _ = contract.wait_split(3, 0)
    assert contract.active_holders() == uids(granted)
    assert contract.seats_in_use() == 3
    assert contract.successful("CheckoutLicense") == 3
    assert 'operation="CheckoutLicense",outcome="retried"' in op.metrics()


# --- contract with consumption -------------------------------------------------------------------------


def test_contract_with_consumption_is_one_spec_seats_checked_out_and_usage_metered_hourly(
    contract: Contract,
) -> None:
    h0 = datetime(2031, 3, 4, 10, tzinfo=UTC)
    contract.emulator.admin.set_clock(h0 + timedelta(minutes=1))
    contract.product(
        metering={"dimensions": [{"name": "users", "source": "Replicas", "aggregation": "Maximum"}]}
    )
    contract.start(
        (
            "--sample-interval-seconds",
            "1",
            # A lease of its own: metering runs on the leader only, and no other test's operator
            # may hold it.
            "--operator-namespace",
            contract.namespace,
            "--lease-name",
            "mmo-contract-e2e",
            "--lease-duration-seconds",
            "3",
        ),
        env={"AWS_ACCESS_KEY_ID": OPERATOR_KEY[0], "AWS_SECRET_ACCESS_KEY": OPERATOR_KEY[1]},
    )
    contract.deployment(replicas=2)
    granted, _ = contract.wait_split(2, 0)
    assert contract.seats_in_use() == 2

    def sampled() -> bool:
        status = read_product(contract.kube, contract.namespace, APP).get("status") or {}
        metering = MeteringStatus.model_validate(status.get("metering") or {})
        open_hour = metering.open_hour
        if open_hour is None or open_hour.start != h0:
            return False
        return any(d.name == "users" and d.last_value == 2 for d in open_hour.dimensions)

    wait_for("the operator to sample 2 users in the first hour", sampled)

    # The hour closes: MeterUsage reports the dimension (as the operator), the seats stay held.
    contract.emulator.admin.set_clock(h0 + timedelta(hours=1, minutes=2))
    records = wait_for(
        "the users record of the first hour",
        lambda: [
            r
            for r in contract.emulator.admin.meter_records(PRODUCT_CODE)
            if r["dimension"] == "users" and r["hour"].startswith("2031-03-04T10:00")
        ],
    )
    assert len(records) == 1
    assert Decimal(records[0]["quantity"]) == 2
    assert contract.active_holders() == uids(granted)
    assert contract.seats_in_use() == 2


# --- per-cluster entitlements ---------------------------------------------------------------------------


def test_per_cluster_entitlements_are_checked_out_once_as_the_operator_and_checked_in_at_the_end(
    contract: Contract,
) -> None:
    contract.product(
        entitlements=[{"name": "seats", "perPod": 1}, {"name": "site", "unit": "None", "perCluster": 1}]
    )
    contract.start(env={"AWS_ACCESS_KEY_ID": OPERATOR_KEY[0], "AWS_SECRET_ACCESS_KEY": OPERATOR_KEY[1]})
    contract.deployment(replicas=2)
    granted, _ = contract.wait_split(2, 0)

    active = [c for c in contract.emulator.admin.license_checkouts(LICENSE_ARN) if c["state"] == "Active"]
    product_wide = [c for c in active if c["nodeId"].startswith("cluster-")]
    per_pod = [c for c in active if not c["nodeId"].startswith("cluster-")]
    # One checkout of "site" for the product, signed as the operator; one seat per pod, as the pod.
    assert len(product_wide) == 1
    assert product_wide[0]["entitlements"] == [{"Name": "site", "Unit": "None"}]
    assert product_wide[0]["podUid"] is None
    assert {c["podUid"] for c in per_pod} == uids(granted)
    assert contract.seats_in_use() == 2

    # No pod left: the pods' seats and the product's checkout are all returned.
    contract.scale(0)
    wait_for(
        "every checkout returned",
        lambda: (
            not [c for c in contract.emulator.admin.license_checkouts(LICENSE_ARN) if c["state"] == "Active"]
        ),
    )
    assert contract.successful("CheckInLicense") == 3


def test_a_pod_that_went_away_while_the_operator_was_down_has_its_seat_checked_in_after_restart(
    contract: Contract,
) -> None:
    contract.product()
    # With an identity of its own, the operator can check in a seat whose pod (and so whose pod
    # identity) is gone.
    op = contract.start(env={"AWS_ACCESS_KEY_ID": OPERATOR_KEY[0], "AWS_SECRET_ACCESS_KEY": OPERATOR_KEY[1]})
    contract.deployment(replicas=3)
    contract.wait_split(3, 0)

    op.kill()
    contract.scale(2)
    wait_for("one pod gone", lambda: len(pods(contract.kube, contract.namespace, APP)) == 2)
    assert contract.seats_in_use() == 3  # nobody returned it while the operator was down
    op = op.restart()
    wait_for("the gone pod's seat checked in", lambda: contract.seats_in_use() == 2)
    remaining = uids(contract.live_pods())
    assert contract.active_holders() == remaining
    checkins = [
        e for e in contract.emulator.admin.events(operation="CheckInLicense") if not e.get("errorCode")
    ]
    assert len(checkins) == 1
    assert checkins[0]["userIdentity"]["arn"].endswith(":user/metering-operator")
    assert contract.successful("CheckoutLicense") == 3  # the live pods kept theirs


# --- Perpetual checkouts --------------------------------------------------------------------------------


def test_perpetual_checkouts_draw_seats_down_for_good_never_extended_nor_checked_in(
    contract: Contract,
) -> None:
    """``checkoutType: Perpetual`` (docs/pricing-models.md): each pod's checkout consumes its seat
    for good. It is never extended (AWS refuses to extend a PERPETUAL checkout) nor checked in (AWS
    answers ConflictException): a gone pod's lease is forgotten and its seat stays drawn down, so
    once the contract's 3 seats are consumed a new pod waits with SeatsExhausted although only two
    pods run."""
    contract.product(checkout_type="Perpetual")
    contract.start()
    contract.deployment(replicas=2)
    granted, _ = contract.wait_split(2, 0)
    checkouts = {c["nodeId"]: c for c in contract.emulator.admin.license_checkouts(LICENSE_ARN)}
    assert set(checkouts) == uids(granted)
    for checkout in checkouts.values():
        assert checkout["checkoutType"] == "PERPETUAL"
        assert checkout["expiration"] is None  # the contract has no end: nothing lapses
    assert contract.seats_in_use() == 2

    # Three hours on the emulator's clock, which the operator follows: a PROVISIONAL lease would
    # have been extended (or lapsed); these are neither.
    contract.emulator.admin.advance_clock(3 * 3600)
    assert contract.seats_in_use() == 2
    assert contract.active_holders() == uids(granted)

    # A granted pod goes away: its seat is not returned; the Deployment's replacement consumes the
    # third seat.
    first, second = sorted(granted, key=lambda p: p["metadata"]["name"])
    core = client.CoreV1Api(contract.kube)
    core.delete_namespaced_pod(first["metadata"]["name"], contract.namespace, grace_period_seconds=0)
    granted, _ = contract.wait_split(2, 0)
    assert first["metadata"]["uid"] not in uids(granted)
    wait_for("3 seats consumed", lambda: contract.seats_in_use() == 3)

    # Another goes away: no seat is left, so its replacement waits behind the gate -- the operator
    # looked and decided (the SeatsExhausted Event) while only two pods exist.
    core.delete_namespaced_pod(second["metadata"]["name"], contract.namespace, grace_period_seconds=0)
    granted, waiting = contract.wait_split(1, 1)
    waiter = waiting[0]["metadata"]["name"]
    wait_for(
        "the SeatsExhausted Event",
        lambda: "SeatsExhausted" in {e.reason for e in pod_events(contract.kube, contract.namespace, waiter)},
    )
    assert contract.seats_in_use() == 3
    assert contract.calls("ExtendLicenseConsumption") == 0
    assert contract.calls("CheckInLicense") == 0
    # Three checkouts in all (a retry after our clock caught up with the jump replays its ClientToken
    # and gets the same checkout: not a second seat).
    assert len(contract.emulator.admin.license_checkouts(LICENSE_ARN)) == 3
    # The operator's seat record forgot the gone pods' leases: it holds the live pod's only.
    records = SeatRecords(contract.kube, "default").load(contract.namespace, APP)
    assert {h for h, s in records.items() if s.lease is not None} == uids(granted)


# --- the product's end ----------------------------------------------------------------------------------


def test_deleting_the_product_checks_its_seats_in_and_stopping_the_operator_does_not(
    contract: Contract,
) -> None:
    """The operator's own stop keeps the leases (the next start extends them for the running pods);
    the MeteredProduct's deletion returns them at once instead of holding each seat until it lapses."""
    contract.product()
    op = contract.start()
    contract.deployment(replicas=2)
    granted, _ = contract.wait_split(2, 0)
    assert contract.seats_in_use() == 2

    op.stop()  # graceful: SIGTERM, the daemons stop with the operator exiting
    assert contract.calls("CheckInLicense") == 0
    assert contract.active_holders() == uids(granted)
    op = op.restart()
    # The restarted operator gates again (a third pod gets the third seat), and kept the first two.
    contract.scale(3)
    granted, _ = contract.wait_split(3, 0)
    assert contract.active_holders() == uids(granted)
    assert contract.calls("CheckInLicense") == 0

    client.CustomObjectsApi(contract.kube).delete_namespaced_custom_object(
        GROUP, VERSION, contract.namespace, PLURAL, APP
    )
    # No time passes on the emulator's clock: only check-ins free the seats.
    wait_for("every seat checked in", lambda: contract.seats_in_use() == 0)
    assert contract.successful("CheckInLicense") == 3
    records = SeatRecords(contract.kube, "default").load(contract.namespace, APP)
    assert {h for h, s in records.items() if s.lease is not None} == set()
    assert "seat lease(s) checked in" in op.log()
