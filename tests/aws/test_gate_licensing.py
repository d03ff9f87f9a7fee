"""The gate's License Manager side (gate/licensing.py) against the real emulator subprocess.

Unmodified boto3, signing as the operator (an IAM user of the buyer account), checks out the
product's per-cluster entitlements: the SignedToken is verified with the issuer key the emulator
exports, the checkout recorded, and the ClientToken makes a repeated call (an operator that died
before its record was written) hold no second seat. ``NoEntitlementsAllowedException`` is told
apart with ListReceivedLicenses: no seat free now, or not entitled. The seat record is an
in-memory stand-in here (its ConfigMap is exercised end to end in tests/e2e/test_contract_seats.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import boto3
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from metering_operator.aws.errors import ErrorCategory, MeteringError
from metering_operator.aws.license_manager import LicenseManagerClientFactory
from metering_operator.aws.license_models import MARKETPLACE_KEY_FINGERPRINT
from metering_operator.domain.clock import ManualClock
from metering_operator.domain.license_seats import CLUSTER_HOLDER, HeldSeat
from metering_operator.domain.license_token import LicenseTokenError
from metering_operator.domain.product import LicenseManagerSource
from metering_operator.domain.signature import load_public_key
from metering_operator.gate.licensing import LicenseRefused, Licensing, SeatsExhausted
from metering_operator.gate.registrar import Registrar
from metering_operator.kube.seat_records import SeatRecords
from tests.emulator.harness import EmulatorProcess, start_emulator

REGION = "eu-test-3"
BUYER = "555566667777"
KEY = ("AKIAGATELICENSING0001", "gate-licensing-secret")
SKU = "prod-gate-licensing"
LICENSE = "arn:aws:license-manager::294406891311:license:l-gatelicensing0001"
T0 = datetime(2031, 7, 9, 10, 0, tzinfo=UTC)


class MemoryRecords:
    """The seat record's interface, in memory."""

    def __init__(self) -> None:
        self.seats: dict[str, HeldSeat] = {}

    def load(self, namespace: str, product: str) -> dict[str, HeldSeat]:
        return dict(self.seats)

    def put(self, namespace: str, product: str, seat: HeldSeat) -> None:
        self.seats[seat.holder] = seat

    def drop(self, namespace: str, product: str, holder: str) -> None:
        self.seats.pop(holder, None)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorProcess]:
    base = tmp_path
    config = {
        "region": REGION,
        "staticCredentials": [
            {"accessKeyId": KEY[0], "secretAccessKey": KEY[1], "arn": f"arn:aws:iam::{BUYER}:user/operator"}
        ],
        "licenses": [
            {
                "licenseArn": LICENSE,
                "productSKU": SKU,
                "buyerAccount": BUYER,
                "entitlements": [{"name": "site", "unit": "Count", "maxCount": 1}],
            }
        ],
    }
    emu = start_emulator(config, base / "state")
    try:
        yield emu
    finally:
        emu.stop()


class World:
    def __init__(self, emulator: EmulatorProcess) -> None:
        self.emulator = emulator
        emulator.admin.set_clock(T0)
        self.clock = ManualClock(T0)
        self.records = MemoryRecords()
        # Only per-cluster checkouts here: the operator's own identity, no pod, no registrar.
        self.licensing = Licensing(cast(Registrar, None), cast(SeatRecords, self.records), REGION, self.clock)
        session = boto3.Session(aws_access_key_id=KEY[0], aws_secret_access_key=KEY[1])
        self.licensing.factory = LicenseManagerClientFactory(
            REGION, endpoint_url=emulator.url, session=session
        )
        self.key = load_public_key(emulator.admin.license_issuer_key_pem(MARKETPLACE_KEY_FINGERPRINT))

    def checkout(self, product_uid: str, count: int = 1, **spec: Any) -> HeldSeat:
        source = LicenseManagerSource.model_validate(
            {
                "productSKU": SKU,
                "entitlements": [{"name": "site", "perCluster": 1}],
                **spec,
            }
        )
        return self.licensing.checkout(
            namespace="shop",
            product="contract",
            product_uid=product_uid,
            product_code="gatelicensingproduct01",
            source=source,
            issuer_key=self.key,
            holder=CLUSTER_HOLDER,
            count=count,
        )

    def advance(self, delta: timedelta) -> None:
        self.emulator.admin.advance_clock(delta.total_seconds())
        self.clock.advance(delta)

    def active(self) -> list[dict[str, Any]]:
        return [c for c in self.emulator.admin.license_checkouts(LICENSE) if c["state"] == "Active"]


@pytest.fixture
def world(emulator: EmulatorProcess) -> World:
    return World(emulator)


def test_a_checkout_is_verified_recorded_and_a_repeat_holds_no_second_seat(world: World) -> None:
    seat = world.checkout("product-a")
    assert seat.lease is not None
    assert world.records.seats[CLUSTER_HOLDER] == seat
    assert seat.lease.expiration == T0 + timedelta(minutes=60)
    (active,) = world.active()
    assert active["nodeId"] == "cluster-product-a"
    # The operator died before its record: the same ClientToken gets the same checkout back.
    again = world.checkout("product-a")
    assert again.lease == seat.lease
    assert len(world.active()) == 1


def test_a_repeat_of_a_lapsed_checkout_moves_to_the_next_client_token(world: World) -> None:
    first = world.checkout("product-b")
    world.advance(timedelta(minutes=61))
    assert world.active() == []
    second = world.checkout("product-b")  # same number: License Manager replays the lapsed answer
    assert second.count == 2
    assert second.lease is not None
    assert first.lease is not None
    assert second.lease.token != first.lease.token
    assert len(world.active()) == 1


def test_no_seat_free_now_is_told_from_not_entitled(world: World) -> None:
    world.checkout("product-c")
    with pytest.raises(SeatsExhausted, match="no seat is free now"):
        world.checkout("product-d")
    with pytest.raises(LicenseRefused, match="no entitlement gpus"):
        world.checkout("product-d", entitlements=[{"name": "gpus", "perCluster": 1}])
    with pytest.raises(LicenseRefused, match="has 1 Count in all, 2 are asked"):
        world.checkout("product-d", entitlements=[{"name": "site", "perCluster": 2}])


def test_extend_then_check_in_and_a_second_check_in_is_harmless(world: World) -> None:
    seat = world.checkout("product-e")
    world.advance(timedelta(minutes=45))
    extended = world.licensing.extend("shop", "contract", "gatelicensingproduct01", seat)
    assert extended.lease is not None
    assert extended.lease.expiration == T0 + timedelta(minutes=105)
    assert world.records.seats[CLUSTER_HOLDER] == extended
    world.licensing.check_in("shop", "contract", "gatelicensingproduct01", extended)
    assert world.active() == []
    assert CLUSTER_HOLDER not in world.records.seats
    world.licensing.check_in("shop", "contract", "gatelicensingproduct01", extended)  # Gone: fine
    with pytest.raises(MeteringError) as gone:
        world.licensing.extend("shop", "contract", "gatelicensingproduct01", extended)
    assert gone.value.category is ErrorCategory.GONE


def test_a_token_from_another_key_is_checked_in_again_and_refused(world: World) -> None:
    wrong = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    world.key = wrong
    with pytest.raises(LicenseTokenError) as exc:
        world.checkout("product-f")
    assert exc.value.reason == "BadSignature"
    assert world.active() == []  # the unusable checkout went straight back
    assert CLUSTER_HOLDER not in world.records.seats


def test_a_refusal_that_cannot_be_classified_is_neither_a_denial_nor_a_wait(world: World) -> None:
    world.checkout("product-g")
    world.emulator.admin.set_fault("ListReceivedLicenses", fail_with="RateLimitExceededException")
    with pytest.raises(MeteringError) as exc:
        world.checkout("product-h")
    assert exc.value.retryable
    assert "no seat free, or not entitled?" in exc.value.message


def test_a_checkout_checked_in_unused_is_not_replayed_by_the_retry(world: World) -> None:
    """Our clock 10 minutes behind License Manager's: the token looks issued in the future, so the
    checkout goes back unused. The retry must not reuse its ClientToken (License Manager would
    replay the checked-in checkout: a lease holding no seat) but check out anew."""
    world.emulator.admin.advance_clock(600)
    with pytest.raises(LicenseTokenError):
        world.checkout("product-i")
    assert world.active() == []
    assert [e.get("errorCode") for e in world.emulator.admin.events(operation="CheckInLicense")] == [None]
    world.clock.advance(timedelta(minutes=10))
    seat = world.checkout("product-i")
    assert seat.count == 2
    assert seat.lease is not None
    (active,) = world.active()
    assert active["licenseConsumptionToken"] == seat.lease.token


def test_a_perpetual_checkout_is_never_checked_in_and_the_retry_gets_the_same_one(world: World) -> None:
    """A PERPETUAL checkout cannot go back (AWS: ConflictException): after a failed verification it is
    kept, and the retry's same ClientToken gets the same checkout instead of consuming another."""
    world.emulator.admin.advance_clock(600)
    with pytest.raises(LicenseTokenError):
        world.checkout("product-j", checkoutType="Perpetual")
    (first,) = world.active()
    world.clock.advance(timedelta(minutes=10))
    seat = world.checkout("product-j", checkoutType="Perpetual")
    assert seat.count == 1
    assert seat.lease is not None
    assert seat.lease.token == first["licenseConsumptionToken"]
    assert [c["licenseConsumptionToken"] for c in world.active()] == [seat.lease.token]
    assert world.emulator.admin.events(operation="CheckInLicense") == []
