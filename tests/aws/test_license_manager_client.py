"""The License Manager client, end to end against the real emulator subprocess.

A pod's IRSA credentials (STS AssumeRoleWithWebIdentity with a test issuer's token) sign the
License Manager calls through unmodified boto3; the SignedToken is verified with the pure domain
check and the issuer key the emulator exports; errors arrive classified; throttling is retried with
the shared backoff, visible in the metrics.
"""

from __future__ import annotations

import itertools
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from metering_operator import metrics
from metering_operator.aws.backoff import Backoff
from metering_operator.aws.errors import ErrorCategory, MeteringError
from metering_operator.aws.irsa import WebIdentityExchanger, session_name_for_pod
from metering_operator.aws.license_manager import LicenseManagerClient, LicenseManagerClientFactory
from metering_operator.aws.license_models import (
    MARKETPLACE_KEY_FINGERPRINT,
    CheckInLicenseRequest,
    CheckoutLicenseRequest,
    CheckoutLicenseResult,
    CheckoutType,
    EntitlementData,
    ExtendLicenseConsumptionRequest,
    GetLicenseRequest,
    ListReceivedLicensesRequest,
)
from metering_operator.aws.region import RegionError
from metering_operator.domain.license_token import (
    CheckoutExpectation,
    LicenseTokenError,
    RequiredEntitlement,
    verify_license_token,
)
from tests.emulator.harness import EmulatorProcess, TestIssuer, start_emulator

REGION = "eu-test-2"  # made up: nothing may depend on a particular Region
BUYER = "555566667777"
ROLE = f"arn:aws:iam::{BUYER}:role/contract-pods"
SKU = "prod-contract-test"
LICENSE = "arn:aws:license-manager::294406891311:license:l-1234567890abcdef1234567890abcdef"
START = datetime(2031, 7, 9, 10, 20, tzinfo=UTC)
SEAT = EntitlementData(name="seats", unit="Count", value="1")
_DAYS = itertools.count()


class World:
    def __init__(self, emulator: EmulatorProcess, issuer: TestIssuer) -> None:
        self.emulator = emulator
        self.issuer = issuer
        self.exchanger = WebIdentityExchanger(REGION, endpoint_url=emulator.url)
        self.factory = LicenseManagerClientFactory(REGION, endpoint_url=emulator.url)

    def pod_client(self, pod_uid: str | None = None) -> LicenseManagerClient:
        uid = pod_uid or str(uuid.uuid4())
        token = self.issuer.token("shop", "app", pod_name=f"pod-{uid[:8]}", pod_uid=uid)
        creds = self.exchanger.assume(ROLE, token, session_name=session_name_for_pod(uid))
        return self.factory.for_credentials(creds)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base: Path = tmp_path_factory.mktemp("lm")
    issuer = TestIssuer(base / "issuer")
    config = {
        "region": REGION,
        "issuers": [issuer.issuer_config()],
        "roles": [{"arn": ROLE, "trust": [{"issuer": issuer.issuer, "subjects": ["*"]}]}],
        "licenses": [
            {
                "licenseArn": LICENSE,
                "productSKU": SKU,
                "buyerAccount": BUYER,
                "entitlements": [{"name": "seats", "unit": "Count", "maxCount": 2}],
            }
        ],
    }
    emulator = start_emulator(config, base / "state")
    try:
        yield World(emulator, issuer)
    finally:
        assert emulator.stop() == 0, emulator.log()[-4000:]


@pytest.fixture
def now(world: World) -> Iterator[datetime]:
    """The emulator clock at a day of its own per test: checkouts of earlier tests have expired."""
    moment = START + timedelta(days=next(_DAYS))
    world.emulator.admin.set_clock(moment)
    yield moment
    world.emulator.admin.clear_faults()
    world.emulator.admin.reset_clock()


def checkout(client: LicenseManagerClient, client_token: str | None = None) -> CheckoutLicenseResult:
    return client.checkout_license(
        CheckoutLicenseRequest(
            product_sku=SKU,
            checkout_type=CheckoutType.PROVISIONAL,
            key_fingerprint=MARKETPLACE_KEY_FINGERPRINT,
            entitlements=(SEAT,),
            client_token=client_token or uuid.uuid4().hex,
            node_id="node-a",
        )
    )


def expectation(result: CheckoutLicenseResult) -> CheckoutExpectation:
    return CheckoutExpectation(
        key_fingerprint=MARKETPLACE_KEY_FINGERPRINT,
        product_sku=SKU,
        license_consumption_token=result.license_consumption_token,
        entitlements=(RequiredEntitlement("seats", "Count", Decimal(1)),),
        license_arn=result.license_arn,
        node_id="node-a",
    )


def check_in_all(world: World, client: LicenseManagerClient) -> None:
    for row in world.emulator.admin.license_checkouts(LICENSE):
        if row["state"] == "Active":
            client.check_in_license(
                CheckInLicenseRequest(license_consumption_token=row["licenseConsumptionToken"])
            )


def test_checkout_verify_extend_check_in(world: World, now: datetime) -> None:
    client = world.pod_client()
    result = checkout(client)
    assert result.entitlements_allowed == (SEAT,)
    # The emulator clock keeps running from where the test set it: times are read off the answer.
    issued = result.issued_at
    assert issued is not None
    assert timedelta(0) <= issued - now < timedelta(minutes=1)
    assert result.expiration == issued + timedelta(minutes=60)
    assert result.signed_token is not None
    key = world.emulator.admin.license_issuer_key_pem(MARKETPLACE_KEY_FINGERPRINT)
    verified = verify_license_token(result.signed_token, key, expectation(result), now=issued)
    assert verified.license_arn == LICENSE
    # The same token is refused once its hour is over: extending is what keeps a pod entitled.
    with pytest.raises(LicenseTokenError) as late:
        verify_license_token(
            result.signed_token, key, expectation(result), now=issued + timedelta(minutes=60)
        )
    assert late.value.reason == "Expired"

    world.emulator.admin.advance_clock(50 * 60)
    extended = client.extend_license_consumption(
        ExtendLicenseConsumptionRequest(license_consumption_token=result.license_consumption_token)
    )
    assert extended.expiration is not None
    assert timedelta(minutes=110) <= extended.expiration - issued < timedelta(minutes=111)
    client.check_in_license(CheckInLicenseRequest(license_consumption_token=result.license_consumption_token))
    with pytest.raises(MeteringError) as gone:
        client.check_in_license(
            CheckInLicenseRequest(license_consumption_token=result.license_consumption_token)
        )
    assert (gone.value.code, gone.value.category) == ("ResourceNotFoundException", ErrorCategory.GONE)


def test_no_seat_left_is_a_final_denial_and_an_expired_checkout_is_gone(world: World, now: datetime) -> None:
    pods = [world.pod_client() for _ in range(3)]
    held = [checkout(pod) for pod in pods[:2]]
    with pytest.raises(MeteringError) as denied:
        checkout(pods[2])
    assert denied.value.code == "NoEntitlementsAllowedException"
    assert denied.value.category is ErrorCategory.DENIED
    assert denied.value.denied
    assert not denied.value.retryable

    world.emulator.admin.advance_clock(61 * 60)  # the operator died: nobody extended or checked in
    with pytest.raises(MeteringError) as gone:
        pods[0].extend_license_consumption(
            ExtendLicenseConsumptionRequest(license_consumption_token=held[0].license_consumption_token)
        )
    assert gone.value.category is ErrorCategory.GONE
    checkout(pods[2])  # the seats came back after 60 minutes
    check_in_all(world, pods[2])


def test_throttling_is_retryable_and_retried_with_the_shared_backoff(world: World, now: datetime) -> None:
    client = world.pod_client()
    world.emulator.admin.set_fault("CheckoutLicense", throttle_rate=1.0)
    before = metrics.REGISTRY.get_sample_value(
        "marketplace_metering_aws_call_errors_total",
        {"operation": "CheckoutLicense", "code": "RateLimitExceededException"},
    )
    token = uuid.uuid4().hex  # one ClientToken for every attempt: a retry never holds a second seat
    delays = Backoff(base=0.5, cap=8).delays(random.Random(7).random)
    attempts: list[float] = []
    result = None
    for delay in delays:
        try:
            result = checkout(client, token)
            break
        except MeteringError as exc:
            if not exc.retryable:
                raise
            attempts.append(delay)  # a real caller waits `delay` (kopf's delay); the test does not sleep
            if len(attempts) == 3:
                world.emulator.admin.clear_faults()
    assert result is not None
    assert len(attempts) == 3
    after = metrics.REGISTRY.get_sample_value(
        "marketplace_metering_aws_call_errors_total",
        {"operation": "CheckoutLicense", "code": "RateLimitExceededException"},
    )
    assert (after or 0) - (before or 0) == 3
    active = [c for c in world.emulator.admin.license_checkouts(LICENSE) if c["state"] == "Active"]
    assert [c["licenseConsumptionToken"] for c in active] == [result.license_consumption_token]
    check_in_all(world, client)


def test_get_and_list_licenses(world: World, now: datetime) -> None:
    client = world.pod_client()
    license_ = client.get_license(GetLicenseRequest(license_arn=LICENSE)).license
    seats = license_.entitlement("seats")
    assert seats is not None
    assert (license_.product_sku, seats.max_count) == (SKU, 2)
    listed = client.list_received_licenses(ListReceivedLicensesRequest(max_results=10))
    assert [lic.license_arn for lic in listed.licenses] == [LICENSE]
    assert listed.licenses[0].received_metadata is not None
    assert listed.licenses[0].received_metadata.received_status == "ACTIVE"


def test_unmodified_boto3_finds_the_emulator_through_the_service_endpoint_variable(
    world: World, now: datetime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_LICENSE_MANAGER", world.emulator.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "unknown")
    with LicenseManagerClient.create(REGION) as client:
        assert client.boto_client.meta.endpoint_url == world.emulator.url
        assert client.region == REGION
        with pytest.raises(MeteringError) as exc:  # the emulator answered: it does not know the key
            client.get_license(GetLicenseRequest(license_arn=LICENSE))
    assert exc.value.code == "UnrecognizedClientException"


def test_a_region_is_required_and_never_assumed() -> None:
    with pytest.raises(RegionError):
        LicenseManagerClient.create("")
    with pytest.raises(RegionError):
        LicenseManagerClientFactory("")


def test_the_client_refuses_a_boto3_client_of_another_service(world: World) -> None:
    import boto3

    other: Any = boto3.client("sts", region_name=REGION, endpoint_url=world.emulator.url)
    with pytest.raises(ValueError, match="license-manager"):
        LicenseManagerClient(other)
