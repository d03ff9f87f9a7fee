"""Admin API (billing, events, clock, config) and state that survives a crash of the emulator."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from botocore.exceptions import ClientError

from tests.emulator.conftest import BUYER, CUSTOM, HOURLY, NAMESPACE, REGION, ROLE, base_config, metering
from tests.emulator.harness import (
    AdminError,
    EmulatorProcess,
    TestIssuer,
    start_emulator,
    web_identity_credentials,
)


def test_state_survives_kill_and_restart(tmp_path: Path, issuer: TestIssuer) -> None:
    emu = start_emulator(base_config(issuer), tmp_path / "state")
    try:
        start = dt.datetime(2031, 1, 1, 10, 15, tzinfo=dt.UTC)
        emu.admin.set_clock(start)
        uid = str(uuid.uuid4())
        creds = web_identity_credentials(
            emu, ROLE, issuer.token(NAMESPACE, "app", pod_uid=uid), region=REGION
        )
        client = metering(emu, creds)
        signature = client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1, Nonce=uid)["Signature"]
        ts = start - dt.timedelta(hours=1)
        record_id = client.meter_usage(
            ProductCode=CUSTOM, Timestamp=ts, UsageDimension="cpu", UsageQuantity=9
        )["MeteringRecordId"]
        token = emu.admin.mint_registration_token(CUSTOM, BUYER)
        pem = emu.admin.public_key_pem(HOURLY, 1)
    except BaseException:
        emu.kill()
        raise
    emu2 = emu.restart(kill=True)  # SIGKILL: no clean shutdown
    try:
        assert emu2.url != emu.url or emu2.process.pid != emu.process.pid
        assert emu2.admin.clock() - start < dt.timedelta(minutes=1), "the clock offset survives"
        # The same temporary credentials still work; the record and registration are remembered.
        client2 = metering(emu2, creds)
        again = client2.meter_usage(ProductCode=CUSTOM, Timestamp=ts, UsageDimension="cpu", UsageQuantity=9)
        assert again["MeteringRecordId"] == record_id
        with pytest.raises(client2.exceptions.DuplicateRequestException):
            client2.meter_usage(ProductCode=CUSTOM, Timestamp=ts, UsageDimension="cpu", UsageQuantity=10)
        regs = emu2.admin.registrations(HOURLY)
        assert [r["identity"]["podUid"] for r in regs] == [uid]
        assert emu2.admin.public_key_pem(HOURLY, 1) == pem, "key pairs are kept in the state dir"
        second = client2.register_usage(ProductCode=HOURLY, PublicKeyVersion=1, Nonce=uid)["Signature"]
        assert second.split(".")[0] == signature.split(".")[0]
        assert emu2.admin.registrations(HOURLY)[0]["calls"] == 2
        assert client2.resolve_customer(RegistrationToken=token)["CustomerAWSAccountId"] == BUYER
        assert len(emu2.admin.events()) >= 4
    finally:
        assert emu2.stop() == 0


def test_billing_prorates_registered_pods_with_a_minute_minimum(
    emulator: EmulatorProcess, issuer: TestIssuer
) -> None:
    code = f"bill-{uuid.uuid4().hex[:8]}"
    emulator.admin.put_product(
        {
            "productCode": code,
            "entitledAccounts": [BUYER],
            "hourlyPrice": 1.2,
            "dimensions": [{"name": "u", "price": 2}],
        }
    )
    start = dt.datetime(2031, 2, 1, 8, 0, tzinfo=dt.UTC)
    emulator.admin.set_clock(start)
    try:
        uids = [str(uuid.uuid4()), str(uuid.uuid4())]
        clients = [
            metering(
                emulator,
                web_identity_credentials(
                    emulator, ROLE, issuer.token(NAMESPACE, "app", pod_uid=u), region=REGION
                ),
            )
            for u in uids
        ]
        for client in clients:
            client.register_usage(ProductCode=code, PublicKeyVersion=1)
        emulator.admin.advance_clock(10)
        emulator.admin.deregister(uids[0], code)
        emulator.admin.advance_clock(90 * 60 - 10)
        emulator.admin.deregister(uids[1])
        for client in clients:
            client.meter_usage(
                ProductCode=code, Timestamp=start, UsageDimension="u", UsageQuantityAsDecimal="1.5"
            )
        emulator.admin.advance_clock(3600)
        bill = emulator.admin.billing(code)
    finally:
        emulator.admin.reset_clock()
    pods = {p["podUid"]: p for p in bill["pods"]}
    assert pods[uids[0]]["billedSeconds"] == pytest.approx(60, abs=1), "one-minute minimum"
    assert pods[uids[1]]["billedSeconds"] == pytest.approx(5400, abs=1), "stops at the deregistration"
    assert pods[uids[1]]["amount"] == pytest.approx(1.8, abs=0.001)
    [dimension] = bill["dimensions"]
    assert (dimension["hour"], dimension["quantity"], dimension["records"]) == (
        "2031-02-01T08:00:00Z",
        "3.0",
        2,
    )
    assert dimension["amount"] == pytest.approx(6.0)


def test_event_log_records_caller_parameters_and_errors(
    emulator: EmulatorProcess, issuer: TestIssuer
) -> None:
    uid = str(uuid.uuid4())
    creds = web_identity_credentials(
        emulator, ROLE, issuer.token(NAMESPACE, "app", pod_uid=uid), region=REGION
    )
    with pytest.raises(ClientError):
        metering(emulator, creds).register_usage(ProductCode="nope", PublicKeyVersion=1, Nonce=uid)
    event = emulator.admin.events(operation="RegisterUsage", error_code="InvalidProductCodeException")[-1]
    assert event["userIdentity"]["podUid"] == uid
    assert event["requestParameters"] == {"ProductCode": "nope", "PublicKeyVersion": 1, "Nonce": uid}
    assert event["httpStatus"] == 400
    assert event["awsRegion"] == REGION
    assert event["eventSource"] == "metering-marketplace.amazonaws.com"


def test_admin_api_rejects_bad_input_clearly(emulator: EmulatorProcess) -> None:
    with pytest.raises(AdminError) as exc:
        emulator.admin.put_product({"productCode": "bad code!"})
    assert exc.value.status == 400
    assert "productCode" in exc.value.body
    with pytest.raises(AdminError) as exc:
        emulator.admin.set_fault("NoSuchOperation", throttle_rate=1)
    assert exc.value.status == 400
    with pytest.raises(AdminError) as exc:
        emulator.admin.request("POST", "/clock", {"now": "yesterday"})
    assert exc.value.status == 400
    with pytest.raises(AdminError) as exc:
        emulator.admin.get("/nothing-here")
    assert exc.value.status == 404


def test_config_reload_and_clear_config_errors(tmp_path: Path, issuer: TestIssuer) -> None:
    config = base_config(issuer)
    config_path = tmp_path / "emulator.yaml"
    config_path.write_text(yaml.safe_dump(config))
    emu = start_emulator(config_path, tmp_path / "state")
    try:
        assert [p["productCode"] for p in emu.admin.config()["products"]][:1] == [HOURLY]
        config["products"].append({"productCode": "added-later"})
        config_path.write_text(yaml.safe_dump(config))
        reloaded = emu.admin.reload_config()
        assert "added-later" in [p["productCode"] for p in reloaded["products"]]
        config_path.write_text("products: [{productCode: 'bad code!'}]\n")
        with pytest.raises(AdminError) as exc:
            emu.admin.reload_config()
        assert "productCode" in exc.value.body
        assert "added-later" in [p["productCode"] for p in emu.admin.config()["products"]], "old config kept"
    finally:
        emu.stop()
    result = subprocess.run(
        [sys.executable, "-m", "metering_operator.cli", "emulator", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "products.0.productCode" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_config_is_an_empty_valid_emulator(tmp_path: Path) -> None:
    emu = start_emulator(None, tmp_path / "state")
    try:
        config = emu.admin.config()
        assert (config["products"], config["roles"], config["region"]) == ([], [], None)
        assert emu.admin.health()["ok"] is True
    finally:
        assert emu.stop() == 0


def test_example_config_is_valid_and_serves_its_products(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "emulator-config.yaml"
    emu = start_emulator(example, tmp_path / "state")
    try:
        codes = [p["productCode"] for p in emu.admin.config()["products"]]
        assert codes == ["1fszvu527waovqeuhpkyx2b5d", "8s7ahzr2e3n4sv7d1u3hx8ykq", "disabledproduct000000001"]
        assert emu.admin.public_key_pem(codes[0], 2).startswith("-----BEGIN PUBLIC KEY-----")
        [contract] = emu.admin.config()["licenses"]
        fingerprint = contract["issuer"]["keyFingerprint"]
        assert emu.admin.license_issuer_key_pem(fingerprint).startswith("-----BEGIN PUBLIC KEY-----")
        [seats, _, _] = emu.admin.seat_usage(contract["licenseArn"])[0]["entitlements"]
        assert (seats["maxCount"], seats["inUse"]) == (3, "0")
    finally:
        assert emu.stop() == 0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/clock", b'{"advanceSeconds": NaN}'),
        ("POST", "/clock", b'{"advanceSeconds": 1e20}'),
        ("POST", "/clock", b'{"advanceSeconds": true}'),
        ("POST", "/clock", b'{"now": "9999-12-31T23:00:00Z"}'),
        ("POST", "/clock", b'{"now": "1900-01-01T00:00:00Z"}'),
        ("POST", "/clock", b'{"now": "2031-01-01T00:00:00"}'),
        (
            "POST",
            "/registration-tokens",
            b'{"productCode": "p", "customerAWSAccountId": "1", "expiresInSeconds": 1e300}',
        ),
        ("POST", "/faults", b'{"operation": "MeterUsage", "latencyMs": Infinity}'),
        ("GET", "/events?since=99999999999999999999999", None),
        ("POST", "/products", b"[1, 2]"),
    ],
)
def test_admin_input_that_would_break_the_emulator_is_refused(
    emulator: EmulatorProcess, method: str, path: str, body: bytes | None
) -> None:
    """Each of these once answered 500 or left the clock unusable for every later AWS call."""
    request = urllib.request.Request(emulator.admin.base + path, data=body, method=method)
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(request, timeout=10)
    assert exc.value.code == 400
    assert json.loads(exc.value.read())["error"]
    clock = emulator.admin.clock()
    assert abs(clock - dt.datetime.now(dt.UTC)) < dt.timedelta(days=1), "the clock was left alone"
    assert emulator.admin.events(operation="no-such-operation") == []


def test_static_credentials_added_at_run_time_sign_requests(emulator: EmulatorProcess) -> None:
    key = f"AKIARUNTIME{uuid.uuid4().hex[:9].upper()}"
    keys = {"aws_access_key_id": key, "aws_secret_access_key": "runtime-secret"}
    with pytest.raises(ClientError) as exc:
        metering(emulator, keys).resolve_customer(RegistrationToken="config-token-1")
    assert exc.value.response["Error"]["Code"] == "UnrecognizedClientException"
    emulator.admin.put_static_credentials(
        {"accessKeyId": key, "secretAccessKey": "runtime-secret", "arn": f"arn:aws:iam::{BUYER}:user/ci"}
    )
    resolved = metering(emulator, keys).resolve_customer(RegistrationToken="config-token-1")
    assert resolved["CustomerAWSAccountId"] == BUYER
    [event] = emulator.admin.events(operation="ResolveCustomer")[-1:]
    assert event["userIdentity"]["arn"] == f"arn:aws:iam::{BUYER}:user/ci"
