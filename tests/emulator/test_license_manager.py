"""License Manager through unmodified boto3: floating seats, the 60-minute rule, signed tokens.

Each test adds its own contract through the admin API (a fresh SKU), so seat counts never leak
between tests sharing the module's emulator; time moves only through the emulator's clock.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import urllib3
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from tests.emulator.conftest import (
    BUYER,
    CONTRACT_LICENSE,
    CONTRACT_SKU,
    MARKETPLACE_FINGERPRINT,
    NAMESPACE,
    NOT_ENTITLED,
    REGION,
    ROLE,
    ROLE_NOT_ENTITLED,
    base_config,
    clock_fixed_at,
    code_of,
    license_manager,
)
from tests.emulator.harness import (
    AdminError,
    EmulatorProcess,
    TestIssuer,
    start_emulator,
    web_identity_credentials,
)

PodCreds = Callable[..., dict[str, str]]
NOW = dt.datetime(2031, 7, 9, 10, 20, tzinfo=dt.UTC)
SEAT = [{"Name": "seats", "Unit": "Count", "Value": "1"}]


@pytest.fixture(autouse=True)
def fixed_clock(emulator: EmulatorProcess) -> Iterator[None]:
    with clock_fixed_at(emulator, NOW):
        yield


def new_contract(emulator: EmulatorProcess, seats: int = 3, **changes: Any) -> tuple[str, str]:
    """A fresh license for the buyer with ``seats`` floating seats: (product SKU, license ARN)."""
    suffix = uuid.uuid4().hex
    sku, arn = f"prod-{suffix[:12]}", f"arn:aws:license-manager::294406891311:license:l-{suffix}"
    entitlements = [
        {"name": "seats", "unit": "Count", "maxCount": seats},
        {"name": "pinned", "unit": "Count", "maxCount": 2, "allowCheckIn": False},
    ]
    emulator.admin.put_license(
        {"licenseArn": arn, "productSKU": sku, "buyerAccount": BUYER, "entitlements": entitlements, **changes}
    )
    return sku, arn


def checkout(client: Any, sku: str, **changes: Any) -> dict[str, Any]:
    params = {
        "ProductSKU": sku,
        "CheckoutType": "PROVISIONAL",
        "KeyFingerprint": MARKETPLACE_FINGERPRINT,
        "Entitlements": SEAT,
        "ClientToken": uuid.uuid4().hex,
        **changes,
    }
    result: dict[str, Any] = client.checkout_license(**params)
    return result


def usage(emulator: EmulatorProcess, arn: str, name: str = "seats") -> dict[str, Any]:
    [view] = emulator.admin.seat_usage(arn)
    entry: dict[str, Any] = next(e for e in view["entitlements"] if e["name"] == name)
    return entry


def test_three_floating_seats_the_fourth_is_refused_until_one_is_checked_in(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    sku, arn = new_contract(emulator, seats=3)
    pods = [license_manager(emulator, pod_creds()) for _ in range(4)]
    results = [checkout(pod, sku, NodeId=f"node-{i}") for i, pod in enumerate(pods[:3])]
    assert [r["EntitlementsAllowed"] for r in results] == [SEAT] * 3
    assert {r["LicenseArn"] for r in results} == {arn}
    assert len({r["LicenseConsumptionToken"] for r in results}) == 3
    assert usage(emulator, arn) | {"activeCheckouts": 3} == usage(emulator, arn)
    assert (usage(emulator, arn)["inUse"], usage(emulator, arn)["available"]) == ("3", "0")

    with pytest.raises(pods[3].exceptions.NoEntitlementsAllowedException) as refused:
        checkout(pods[3], sku)
    assert "3 in use" in refused.value.response["Error"]["Message"]

    pods[0].check_in_license(LicenseConsumptionToken=results[0]["LicenseConsumptionToken"])
    fourth = checkout(pods[3], sku)
    assert fourth["EntitlementsAllowed"] == SEAT
    states = {c["licenseConsumptionToken"]: c["state"] for c in emulator.admin.license_checkouts(arn)}
    assert states[results[0]["LicenseConsumptionToken"]] == "CheckedIn"
    assert list(states.values()).count("Active") == 3
    # A token checked in is gone: a second check-in, or extending it, is refused.
    with pytest.raises(pods[0].exceptions.ResourceNotFoundException):
        pods[0].check_in_license(LicenseConsumptionToken=results[0]["LicenseConsumptionToken"])
    with pytest.raises(pods[0].exceptions.ResourceNotFoundException):
        pods[0].extend_license_consumption(LicenseConsumptionToken=results[0]["LicenseConsumptionToken"])


def test_provisional_seat_returns_after_60_minutes_unless_extended(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    sku, arn = new_contract(emulator, seats=2)
    kept, dropped, waiting = (license_manager(emulator, pod_creds()) for _ in range(3))
    first = checkout(kept, sku)
    checkout(dropped, sku)
    issued = dt.datetime.fromisoformat(first["IssuedAt"])
    assert dt.datetime.fromisoformat(first["Expiration"]) - issued == dt.timedelta(minutes=60)

    emulator.admin.advance_clock(59 * 60)
    with pytest.raises(ClientError) as still_held:
        checkout(waiting, sku)
    assert code_of(still_held) == "NoEntitlementsAllowedException"
    extended = kept.extend_license_consumption(LicenseConsumptionToken=first["LicenseConsumptionToken"])
    # The emulator clock runs on from where it was set: allow the seconds the test itself takes.
    extended_by = dt.datetime.fromisoformat(extended["Expiration"]) - issued
    assert dt.timedelta(minutes=119) <= extended_by < dt.timedelta(minutes=120)

    emulator.admin.advance_clock(2 * 60)  # 61 minutes after checkout: the unextended seat is free
    assert usage(emulator, arn)["inUse"] == "1"
    checkout(waiting, sku)
    with pytest.raises(ClientError) as expired:
        dropped.extend_license_consumption(
            LicenseConsumptionToken=emulator.admin.license_checkouts(arn)[1]["licenseConsumptionToken"]
        )
    assert code_of(expired) == "ResourceNotFoundException"
    assert "expired" in expired.value.response["Error"]["Message"]
    assert [c["state"] for c in emulator.admin.license_checkouts(arn)] == ["Active", "Expired", "Active"]


def test_dry_run_extension_checks_without_extending(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    sku, _ = new_contract(emulator)
    client = license_manager(emulator, pod_creds())
    result = checkout(client, sku)
    emulator.admin.advance_clock(600)
    dry = client.extend_license_consumption(
        LicenseConsumptionToken=result["LicenseConsumptionToken"], DryRun=True
    )
    assert dry["Expiration"] == result["Expiration"]


def test_perpetual_checkout_draws_seats_down_for_good(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    sku, arn = new_contract(emulator, seats=1)
    client = license_manager(emulator, pod_creds())
    result = checkout(client, sku, CheckoutType="PERPETUAL")
    assert result["CheckoutType"] == "PERPETUAL"
    assert "Expiration" not in result  # the license has no end
    emulator.admin.advance_clock(10 * 24 * 3600)
    assert usage(emulator, arn)["inUse"] == "1"
    with pytest.raises(client.exceptions.ConflictException):
        client.check_in_license(LicenseConsumptionToken=result["LicenseConsumptionToken"])
    with pytest.raises(client.exceptions.InvalidParameterValueException):
        client.extend_license_consumption(LicenseConsumptionToken=result["LicenseConsumptionToken"])
    with pytest.raises(client.exceptions.NoEntitlementsAllowedException):
        checkout(client, sku)


def test_client_token_replays_the_answer_and_holds_one_seat(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    sku, arn = new_contract(emulator)
    client = license_manager(emulator, pod_creds())
    token = uuid.uuid4().hex
    first = checkout(client, sku, ClientToken=token)
    again = checkout(client, sku, ClientToken=token)
    assert {k: v for k, v in again.items() if k != "ResponseMetadata"} == {
        k: v for k, v in first.items() if k != "ResponseMetadata"
    }
    assert usage(emulator, arn)["inUse"] == "1"
    with pytest.raises(client.exceptions.ValidationException):
        checkout(client, sku, ClientToken=token, NodeId="another-node")


def test_overage_allowed_entitlement_counts_past_max_and_billing_shows_it(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    client = license_manager(emulator, pod_creds())
    storage = [{"Name": "storage", "Unit": "Gigabytes", "Value": "80"}]
    before = usage(emulator, CONTRACT_LICENSE, "storage")
    checkout(client, CONTRACT_SKU, Entitlements=storage)
    checkout(client, CONTRACT_SKU, Entitlements=storage)
    after = usage(emulator, CONTRACT_LICENSE, "storage")
    assert after["maxCount"] == 100
    assert after["overageAllowed"] is True
    assert float(after["inUse"]) == float(before["inUse"]) + 160
    assert float(after["overage"]) == max(0.0, float(after["inUse"]) - 100)
    assert after["overage"] != "0"


def test_all_or_nothing_and_feature_entitlements(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    client = license_manager(emulator, pod_creds())
    feature = {"Name": "premium", "Unit": "None"}
    granted = checkout(client, CONTRACT_SKU, Entitlements=[feature])
    assert granted["EntitlementsAllowed"] == [feature]
    seats_before = usage(emulator, CONTRACT_LICENSE)["inUse"]
    with pytest.raises(client.exceptions.NoEntitlementsAllowedException) as exc:
        checkout(client, CONTRACT_SKU, Entitlements=[*SEAT, {"Name": "gpu", "Unit": "Count", "Value": "1"}])
    assert "no entitlement gpu" in exc.value.response["Error"]["Message"]
    assert usage(emulator, CONTRACT_LICENSE)["inUse"] == seats_before  # nothing was held
    with pytest.raises(client.exceptions.NoEntitlementsAllowedException):
        checkout(client, CONTRACT_SKU, Entitlements=[{"Name": "seats", "Unit": "Gigabytes", "Value": "1"}])


def test_signed_token_is_a_ps384_jws_from_the_issuer_key(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    sku, arn = new_contract(emulator)
    client = license_manager(emulator, pod_creds())
    result = checkout(client, sku, NodeId="10.0.21.57", Beneficiary="buyer@example.com")
    token = result["SignedToken"]
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "PS384", "typ": "JWT", "kid": MARKETPLACE_FINGERPRINT}
    pem = emulator.admin.license_issuer_key_pem(MARKETPLACE_FINGERPRINT)
    claims = jwt.decode(token, pem, algorithms=["PS384"])
    # Times in the signed JSON are UTC without a zone (AWS's example); the answer's carry a Z.
    issued = dt.datetime.fromisoformat(result["IssuedAt"])
    assert dt.timedelta(0) <= issued - NOW < dt.timedelta(minutes=1)
    assert result["IssuedAt"].endswith("Z")
    assert claims == {
        "entitlementsAllowed": [{"name": "seats", "unit": "Count", "value": "1"}],
        "issuedAt": issued.strftime("%Y-%m-%dT%H:%M:%S"),
        "expiration": (issued + dt.timedelta(minutes=60)).strftime("%Y-%m-%dT%H:%M:%S"),
        "licenseArn": arn,
        "licenseConsumptionToken": result["LicenseConsumptionToken"],
        "nodeId": "10.0.21.57",
        "beneficiary": "buyer@example.com",
        "productSKU": sku,
        "keyFingerprint": MARKETPLACE_FINGERPRINT,
        "checkoutType": "PROVISIONAL",
    }
    # Any other key refuses it, including a product's RegisterUsage key.
    other = emulator.admin.public_key_pem("hourlyprod1", 1)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, other, algorithms=["PS384"])
    exported = (
        emulator.state_dir
        / "keys"
        / "issuer-aws%3A294406891311%3AAWS%2FMarketplace%3Aissuer-fingerprint.pub.pem"
    )
    assert exported.read_text() == pem


def test_get_license_and_list_received_licenses(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    client = license_manager(emulator, pod_creds())
    license_ = client.get_license(LicenseArn=CONTRACT_LICENSE)["License"]
    assert license_["ProductSKU"] == CONTRACT_SKU
    assert license_["Issuer"]["KeyFingerprint"] == MARKETPLACE_FINGERPRINT
    assert license_["Beneficiary"] == BUYER
    assert license_["ConsumptionConfiguration"]["ProvisionalConfiguration"]["MaxTimeToLiveInMinutes"] == 60
    seats = next(e for e in license_["Entitlements"] if e["Name"] == "seats")
    assert (seats["MaxCount"], seats["Overage"], seats["Unit"]) == (3, False, "Count")

    listed = client.list_received_licenses(Filters=[{"Name": "ProductSKU", "Values": [CONTRACT_SKU]}])
    assert [lic["LicenseArn"] for lic in listed["Licenses"]] == [CONTRACT_LICENSE]  # not the other buyer's
    assert listed["Licenses"][0]["ReceivedMetadata"]["ReceivedStatus"] == "ACTIVE"
    everything = client.list_received_licenses()["Licenses"]
    pages, token = [], None
    while True:
        page = client.list_received_licenses(MaxResults=2, **({"NextToken": token} if token else {}))
        pages.extend(page["Licenses"])
        token = page.get("NextToken")
        if not token:
            break
    assert [lic["LicenseArn"] for lic in pages] == [lic["LicenseArn"] for lic in everything]
    assert len(everything) >= 5
    assert {lic["Beneficiary"] for lic in everything} == {BUYER}
    other_buyer = license_manager(emulator, pod_creds(role=ROLE_NOT_ENTITLED))
    theirs = other_buyer.list_received_licenses()["Licenses"]
    assert {lic["Beneficiary"] for lic in theirs} == {NOT_ENTITLED}


def test_license_manager_calls_land_in_the_event_log(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    sku, arn = new_contract(emulator)
    uid = str(uuid.uuid4())
    client = license_manager(emulator, pod_creds(pod_uid=uid))
    result = checkout(client, sku)
    [row] = emulator.admin.license_checkouts(arn)
    assert (row["podUid"], row["callerKey"], row["account"]) == (uid, f"pod:{uid}", BUYER)
    request_id = result["ResponseMetadata"]["RequestId"]
    [event] = [e for e in emulator.admin.events(operation="CheckoutLicense") if e["requestID"] == request_id]
    assert event["eventSource"] == "license-manager.amazonaws.com"
    assert event["userIdentity"]["accountId"] == BUYER
    assert event["requestParameters"]["ProductSKU"] == sku


def test_a_request_signed_for_another_service_is_refused(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    creds = pod_creds()
    body = json.dumps({"LicenseArn": CONTRACT_LICENSE}).encode()
    request = AWSRequest(
        method="POST",
        url=emulator.url + "/",
        data=body,
        headers={
            "X-Amz-Target": "AWSLicenseManager.GetLicense",
            "Content-Type": "application/x-amz-json-1.1",
        },
    )
    signing = Credentials(
        creds["aws_access_key_id"], creds["aws_secret_access_key"], creds["aws_session_token"]
    )
    SigV4Auth(signing, "aws-marketplace", REGION).add_auth(request)
    answer = urllib3.request("POST", emulator.url + "/", body=body, headers=dict(request.headers.items()))
    assert answer.status == 403
    assert answer.json() == {
        "__type": "InvalidSignatureException",
        "message": "Credential should be scoped to correct service: 'license-manager'.",
    }


def test_checkouts_survive_a_killed_emulator(tmp_path: Path, issuer: TestIssuer) -> None:
    emu = start_emulator(base_config(issuer), tmp_path / "state")
    try:
        emu.admin.set_clock(NOW)
        creds = web_identity_credentials(emu, ROLE, issuer.token(NAMESPACE, "app"), region=REGION)
        held = [checkout(license_manager(emu, creds), CONTRACT_SKU) for _ in range(3)]
        pem = emu.admin.license_issuer_key_pem(MARKETPLACE_FINGERPRINT)
    except BaseException:
        emu.kill()
        raise
    emu2 = emu.restart(kill=True)
    try:
        client = license_manager(emu2, creds)
        with pytest.raises(client.exceptions.NoEntitlementsAllowedException):
            checkout(client, CONTRACT_SKU)
        client.check_in_license(LicenseConsumptionToken=held[0]["LicenseConsumptionToken"])
        again = checkout(client, CONTRACT_SKU)
        assert emu2.admin.license_issuer_key_pem(MARKETPLACE_FINGERPRINT) == pem
        jwt.decode(again["SignedToken"], pem, algorithms=["PS384"])
    finally:
        assert emu2.stop() == 0


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"licenseArn": "arn:aws:s3:::bucket"}, "licenseArn must look like"),
        ({"buyerAccount": "12"}, "buyerAccount must be 12 digits"),
        ({"issuer": {"keyFingerprint": "fingerprint"}}, "keyFingerprint must look like"),
        ({"entitlements": [{"name": "seats", "unit": "Seats"}]}, "unit must be one of"),
        ({"entitlements": [{"name": "a"}, {"name": "a"}]}, "duplicate entitlement names: a"),
    ],
)
def test_invalid_licenses_are_refused_with_the_field_named(
    emulator: EmulatorProcess, entry: dict[str, Any], message: str
) -> None:
    base = {"licenseArn": CONTRACT_LICENSE, "productSKU": "x", "buyerAccount": BUYER}
    with pytest.raises(AdminError) as exc:
        emulator.admin.put_license({**base, **entry})
    assert message in str(exc.value)
