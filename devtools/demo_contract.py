"""The demo's second story: a contract-priced product, entitled by AWS License Manager seats.

``make demo-contract`` (``python -m devtools.demo --contract``) runs on the same stack as the
first story (local cluster, emulator, operator as real processes) with a contract instead of an
hourly price: the emulator holds a License Manager contract of 3 floating seats bought by the
buyer account; the MeteredProduct asks for one seat per pod (``entitlement.source:
LicenseManager``). A 3-replica Deployment's pods each check a seat out with their own IRSA
identity and run; the emulator's billing view shows 3 of 3 seats in use. A second workload of the
same product finds no seat left: its pod waits behind the scheduling gate with the reason. Scaling
the first Deployment down checks a seat in, and the waiting pod gets it. Moving the emulator's
clock 45 minutes on shows every lease extended (ExtendLicenseConsumption), so no seat lapses at
the 60-minute mark while its pod runs.

The roles' permissions in the emulator are exactly the chart's IAM policy files
(``charts/marketplace-metering-operator/files/iam/``), so the story also shows that the
documented policies are enough.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from devtools.demo import (
    BUYER_ACCOUNT,
    IRSA_ANNOTATION,
    OPERATOR_SA,
    REPO_ROOT,
    Demo,
    PodSeen,
    PodWatcher,
    Story,
)
from devtools.stack import StackError, cluster_emulator_config, start_emulator
from metering_operator.domain.product import GROUP, SCHEDULING_GATE, VERSION

IAM_DIR = REPO_ROOT / "charts" / "marketplace-metering-operator" / "files" / "iam"
PRODUCT_NAME = "example-contract"
PRODUCT_CODE = "3x5example0product0code00"
PRODUCT_SKU = "prod-demo-contract"
#: The contract's seats: a buyer bought 3 floating seats.
SEATS = 3
LICENSE_ARN = "arn:aws:license-manager::294406891311:license:l-0d3e40c0a1b2c3d4e5f60718293a4b5c"
KEY_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
ISSUER_KEY_CONFIGMAP = "contract-issuer-key"
WEB = "web"
WORKER = "worker"


def policy_actions(name: str) -> list[str]:
    """The IAM actions of one of the chart's policy files: the emulator enforces exactly these."""
    policy = json.loads((IAM_DIR / name).read_text())
    return [action for statement in policy["Statement"] for action in statement["Action"]]


def contract_product() -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": PRODUCT_NAME},
        "spec": {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": PRODUCT_NAME}},
            "entitlement": {
                "mode": "Enforce",
                "scope": "Pod",
                "source": "LicenseManager",
                "licenseManager": {
                    "productSKU": PRODUCT_SKU,
                    "keyFingerprint": KEY_FINGERPRINT,
                    "checkoutType": "Provisional",
                    "entitlements": [{"name": "seats", "unit": "Count", "perPod": 1}],
                    "issuerPublicKey": {
                        "configMapKeyRef": {"name": ISSUER_KEY_CONFIGMAP, "key": "issuer.pem"}
                    },
                },
            },
        },
    }


@dataclass
class ContractDemo(Demo):
    story: Story = field(default_factory=lambda: Story(11))
    workers: PodWatcher | None = None
    key_title = "the contract issuer's public key"
    product_title = "contract MeteredProduct (entitlement.source LicenseManager, one seat per pod)"

    @property
    def app(self) -> str:
        return PRODUCT_NAME

    def run(self) -> None:
        self.sample = contract_product()
        self.step_cluster()
        self.step_emulator()
        self.step_objects()
        self.step_operator()
        self.step_product()
        self.step_web()
        self.step_seats_in_use()
        self.step_worker_waits()
        self.step_scale_down()
        self.step_extended()
        self.step_contract_bill()
        self.finish("`make demo` tells the first story: an hourly product, RegisterUsage and MeterUsage.")

    # -- steps --------------------------------------------------------------------------------

    def step_emulator(self) -> None:
        s = self.story
        assert self.info is not None
        s.step("AWS emulator: License Manager with a contract of 3 floating seats, STS, on loopback")
        state = self.opts.work_dir / "emulator-state"
        shutil.rmtree(state, ignore_errors=True)
        license_ = {
            "licenseArn": LICENSE_ARN,
            "productSKU": PRODUCT_SKU,
            "productName": "Example contract product",
            "buyerAccount": BUYER_ACCOUNT,
            "issuer": {"name": "AWS/Marketplace", "keyFingerprint": KEY_FINGERPRINT},
            "provisionalTtlMinutes": 60,
            "entitlements": [{"name": "seats", "unit": "Count", "maxCount": SEATS}],
        }
        issuer = self.info.issuer
        pods_policy = policy_actions("license-manager.json")
        roles = [
            {
                "arn": self.buyer_role,
                "trust": [{"issuer": issuer, "subjects": [f"system:serviceaccount:{self.ns}:{self.app}"]}],
                "allowedActions": pods_policy,
            },
            {
                # The operator's role for contract products (docs/pricing-models.md): it checks a
                # gone pod's seat in as itself when it no longer holds the pod's session.
                "arn": self.operator_role,
                "trust": [{"issuer": issuer, "subjects": [f"system:serviceaccount:{self.ns}:{OPERATOR_SA}"]}],
                "allowedActions": policy_actions("license-manager.json"),
            },
        ]
        product = {"productCode": PRODUCT_CODE, "entitledAccounts": [BUYER_ACCOUNT]}
        cfg = cluster_emulator_config(
            self.info, region=self.opts.region, products=[product], roles=roles, licenses=[license_]
        )
        self.emulator = start_emulator(cfg, state, self.opts.work_dir / "emulator.log")
        self.hour0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        self.emulator.admin.set_clock(self.hour0)
        s.say(f"listening      {self.emulator.url}  (region {self.opts.region})")
        s.say(f"contract       {LICENSE_ARN}")
        s.say(f"               SKU {PRODUCT_SKU}: seats (Count) x {SEATS}, floating")
        s.say(f"               bought by account {BUYER_ACCOUNT}")
        s.say("               a PROVISIONAL checkout holds its seat 60 minutes unless extended or checked in")
        s.say(f"IRSA roles     {self.buyer_role} (the pods): files/iam/license-manager.json")
        s.say(f"                 = {', '.join(pods_policy)}")
        s.say(f"               {self.operator_role} (the operator): files/iam/license-manager.json")
        s.say(f"clock          set to {self.hour0:%Y-%m-%d %H:%M:%S}Z")
        s.say(f"log            {self.emulator.log_path}")
        s.done("emulator up")

    def namespace_objects(self) -> list[dict[str, Any]]:
        assert self.emulator is not None
        pem = self.emulator.admin.issuer_key_pem(KEY_FINGERPRINT)
        return self.identities_and_key(ISSUER_KEY_CONFIGMAP, "issuer.pem", pem)

    def describe_namespace_objects(self) -> None:
        self.story.say(f"{IRSA_ANNOTATION}: {self.buyer_role}")
        self.story.say(
            f"issuer key {ISSUER_KEY_CONFIGMAP}/issuer.pem: the emulator's License Manager signing key "
            "(verifies each checkout's SignedToken)"
        )

    def describe_product(self) -> None:
        lm = self.sample["spec"]["entitlement"]["licenseManager"]
        self.story.say(f"entitlement    Enforce, scope Pod, source LicenseManager (SKU {lm['productSKU']})")
        for e in lm["entitlements"]:
            self.story.say(
                f"needs          {e['name']} ({e['unit']}) x {e['perPod']} per pod, {lm['checkoutType']}"
            )

    def step_web(self) -> None:
        s = self.story
        assert self.api is not None
        s.step(f"Deployment {WEB} with 3 replicas: each pod checks a seat out with its own identity")
        self.watcher = PodWatcher(self.api, self.ns, f"app.kubernetes.io/name={self.app},component={WEB}")
        for line in self.k().apply([self.workload(WEB, 3)], namespace=self.ns):
            s.say(line)
        pods = self.wait_granted(3)
        self.show_created(pods)
        self.show_checkouts(pods)
        s.done("3/3 pods hold a seat and run")

    def step_seats_in_use(self) -> None:
        s = self.story
        s.step("The emulator's billing view: seats in use")
        usage = self.seats(expect_in_use=SEATS)
        s.say(self.seat_line(usage))
        s.done(f"{usage['inUse']}/{usage['maxCount']} seats in use")

    def step_worker_waits(self) -> None:
        s = self.story
        assert self.api is not None
        s.step(f"A second workload, {WORKER} (1 replica): no seat is left, its pod waits behind the gate")
        self.workers = PodWatcher(self.api, self.ns, f"app.kubernetes.io/name={self.app},component={WORKER}")
        for line in self.k().apply([self.workload(WORKER, 1)], namespace=self.ns):
            s.say(line)
        watcher = self.workers

        def waiting() -> PodSeen | None:
            pods = watcher.current()
            pod = pods[0] if pods else None
            if pod is None or pod.entitlement == "Granted":
                if pod is not None:
                    raise StackError(f"pod {pod.name} was granted a seat, but all {SEATS} are in use")
                return None
            # The operator has tried and written why the pod waits.
            return pod if pod.reason else None

        pod = self.wait(f"the {WORKER} pod to be gated with a reason", waiting)
        s.say(f"{pod.name:<34} created with schedulingGates: [{', '.join(pod.gates_at_creation)}]")
        s.say(f"{'':<34} entitlement: {pod.entitlement}")
        s.say(f"{'':<34} reason: {pod.reason}")
        s.say(self.seat_line(self.seats(expect_in_use=SEATS)))
        s.done(f"{pod.name} waits for a seat (phase {pod.phase}, still gated)")

    def step_scale_down(self) -> None:
        s = self.story
        s.step(f"Scale {WEB} to 2: its seat is checked in, and the waiting {WORKER} pod gets it")
        before = {c["licenseConsumptionToken"] for c in self.checkouts() if c.get("state") == "CheckedIn"}
        self.k().run("scale", f"deployment/{WEB}", "-n", self.ns, "--replicas=2")
        s.say(f"$ kubectl scale deployment/{WEB} --replicas=2")

        def checked_in() -> list[dict[str, Any]] | None:
            new = [
                c
                for c in self.checkouts()
                if c.get("state") == "CheckedIn" and c["licenseConsumptionToken"] not in before
            ]
            return new or None

        returned = self.wait("a seat to be checked in", checked_in)
        for c in returned:
            token = str(c["licenseConsumptionToken"])[:8]
            s.say(f"CheckInLicense {token}.. (pod {c.get('podName')}): seat returned")
        assert self.workers is not None
        worker = self.workers
        web_watcher = self.watcher
        self.watcher = worker
        try:
            pods = self.wait_granted(1)
        finally:
            self.watcher = web_watcher
        self.show_checkouts(pods)
        s.say(self.seat_line(self.seats(expect_in_use=SEATS)))
        s.done(f"{pods[0].name} Granted and Running; 2 {WEB} + 1 {WORKER} hold the 3 seats")

    def step_extended(self) -> None:
        s = self.story
        assert self.emulator is not None
        s.step("45 minutes later: every lease is extended while its pod runs, so no seat lapses")
        before = self.extensions()
        self.advance_clock(self.hour0 + timedelta(minutes=45))
        s.say("a PROVISIONAL checkout would lapse 60 minutes after it was issued; the operator extends it")
        s.say("once 20 minutes or less are left (the operator follows the emulator's clock)")
        self.wait("3 leases extended (ExtendLicenseConsumption)", lambda: self.extensions() >= before + SEATS)
        for c in self.checkouts():
            if c.get("state") == "Active":
                token = str(c["licenseConsumptionToken"])[:8]
                if not c.get("extensions"):
                    raise StackError(f"the lease {token}.. of pod {c.get('podName')} was not extended")
                s.say(
                    f"{token}.. (pod {c.get('podName')}): extended x{c.get('extensions')}, "
                    f"expires {c.get('expiration')}"
                )
        self.advance_clock(self.hour0 + timedelta(minutes=65))
        s.say("past the first expiration:")
        s.say(self.seat_line(self.seats(expect_in_use=SEATS)))
        s.done(f"{self.extensions() - before} leases extended, {SEATS} seats still held")

    def extensions(self) -> int:
        assert self.emulator is not None
        events = self.emulator.admin.events(operation="ExtendLicenseConsumption")
        return sum(1 for e in events if not e.get("errorCode"))

    def step_contract_bill(self) -> None:
        s = self.story
        assert self.emulator is not None
        s.step("What the buyer's contract shows, and the AWS calls made")
        usage = self.seats(expect_in_use=SEATS)
        s.say(self.seat_line(usage))
        s.say("a contract is prepaid: seats in use add nothing to the bill")
        by_state: dict[str, int] = {}
        for c in self.checkouts():
            by_state[str(c.get("state"))] = by_state.get(str(c.get("state")), 0) + 1
        s.say("checkouts: " + ", ".join(f"{state} x{n}" for state, n in sorted(by_state.items())))
        calls: dict[str, int] = {}
        for event in self.emulator.admin.events():
            key = str(event.get("eventName")) + (f" ({event['errorCode']})" if event.get("errorCode") else "")
            calls[key] = calls.get(key, 0) + 1
        s.say("AWS calls seen: " + ", ".join(f"{name} x{n}" for name, n in sorted(calls.items())))
        s.done(f"{by_state.get('Active', 0)} active checkouts, {by_state.get('CheckedIn', 0)} checked in")

    def cleanup(self) -> None:
        if self.workers is not None:
            self.workers.stop()
        super().cleanup()

    # -- helpers ------------------------------------------------------------------------------

    def workload(self, component: str, replicas: int) -> dict[str, Any]:
        deployment = self.deployment(replicas)
        deployment["metadata"]["name"] = component
        for labels in (
            deployment["metadata"]["labels"],
            deployment["spec"]["selector"]["matchLabels"],
            deployment["spec"]["template"]["metadata"]["labels"],
        ):
            labels["component"] = component
        return deployment

    def checkouts(self) -> list[dict[str, Any]]:
        assert self.emulator is not None
        return self.emulator.admin.license_checkouts(LICENSE_ARN)

    def seats(self, *, expect_in_use: int) -> dict[str, Any]:
        assert self.emulator is not None
        admin = self.emulator.admin

        def usage() -> dict[str, Any] | None:
            for contract in admin.seat_usage(LICENSE_ARN):
                for entry in contract.get("entitlements") or []:
                    if entry.get("name") == "seats":
                        held = Decimal(str(entry.get("inUse") or 0))
                        return dict(entry) if held == expect_in_use else None
            return None

        return self.wait(f"{expect_in_use} seats in use in the emulator's billing view", usage)

    @staticmethod
    def seat_line(usage: dict[str, Any]) -> str:
        return (
            f"contract seats: {usage.get('inUse')} in use of {usage.get('maxCount')}, "
            f"{usage.get('available')} available, overage {usage.get('overage')}, "
            f"{usage.get('activeCheckouts')} active checkouts"
        )

    def show_checkouts(self, pods: list[PodSeen]) -> None:
        s = self.story
        by_pod: dict[str, dict[str, Any]] = {}
        for c in self.checkouts():
            if c.get("state") == "Active" and c.get("podUid"):
                by_pod[str(c["podUid"])] = c
        for pod in pods:
            if pod.uid not in by_pod:
                raise StackError(f"the emulator has no active checkout for pod {pod.name}")
            c = by_pod[pod.uid]
            released = (pod.released_at or pod.created_at) - pod.created_at
            s.say(f"{pod.name:<34} STS: token bound to this pod -> role/{self.app}")
            s.say(
                f"{'':<34} CheckoutLicense seats x1 -> token {str(c['licenseConsumptionToken'])[:8]}.., "
                f"expires {c.get('expiration')}; ungated +{released:.2f}s"
            )
        if any(SCHEDULING_GATE not in p.gates_at_creation for p in pods):
            raise StackError(f"a pod was created without the gate {SCHEDULING_GATE}")
