"""RegisterUsage through boto3: the signed JWT and every modelled error."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from botocore.exceptions import ClientError

from tests.emulator.conftest import (
    BUYER,
    DISABLED,
    HOURLY,
    ROLE_NOT_ENTITLED,
    code_of,
    metering,
    static_creds,
)
from tests.emulator.harness import EmulatorProcess, TestIssuer

PodCreds = Callable[..., dict[str, str]]


def test_signature_is_a_ps256_jwt_verifiable_with_the_exported_key(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    uid = str(uuid.uuid4())
    client = metering(emulator, pod_creds(pod_uid=uid))
    before = int(time.time())
    result = client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1, Nonce=uid)
    assert "PublicKeyRotationTimestamp" not in result
    pem = emulator.admin.public_key_pem(HOURLY, 1)
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    exported = (emulator.state_dir / "keys" / f"{HOURLY}.v1.pub.pem").read_text()
    assert exported == pem
    assert jwt.get_unverified_header(result["Signature"])["alg"] == "PS256"
    claims = jwt.decode(result["Signature"], pem, algorithms=["PS256"])
    assert claims["productCode"] == HOURLY
    assert claims["publicKeyVersion"] == 1
    assert claims["nonce"] == uid
    assert before - 1 <= claims["iat"] <= int(time.time()) + 1
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(result["Signature"], emulator.admin.public_key_pem(HOURLY, 2), algorithms=["PS256"])
    regs = [r for r in emulator.admin.registrations(HOURLY) if r["identity"]["podUid"] == uid]
    assert len(regs) == 1
    assert regs[0]["identity"]["accountId"] == BUYER


def test_expired_key_version_answers_rotation_timestamp(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    result = metering(emulator, pod_creds()).register_usage(ProductCode=HOURLY, PublicKeyVersion=2)
    assert result["PublicKeyRotationTimestamp"].year == 2001
    claims = jwt.decode(result["Signature"], emulator.admin.public_key_pem(HOURLY, 2), algorithms=["PS256"])
    assert claims["publicKeyVersion"] == 2
    assert "nonce" not in claims


def test_first_call_checks_entitlement_later_calls_never_fail_on_it(
    emulator: EmulatorProcess, pod_creds: PodCreds
) -> None:
    code = f"prod-{uuid.uuid4().hex[:10]}"
    emulator.admin.put_product({"productCode": code, "entitledAccounts": [BUYER]})
    registered = metering(emulator, pod_creds())
    registered.register_usage(ProductCode=code, PublicKeyVersion=1)
    # The buyer unsubscribes: the running pod keeps working, a new pod is refused.
    emulator.admin.put_product({"productCode": code, "entitledAccounts": []})
    registered.register_usage(ProductCode=code, PublicKeyVersion=1)
    with pytest.raises(ClientError) as exc:
        metering(emulator, pod_creds()).register_usage(ProductCode=code, PublicKeyVersion=1)
    assert code_of(exc) == "CustomerNotEntitledException"
    regs = emulator.admin.registrations(code)
    assert len(regs) == 1
    assert regs[0]["calls"] == 2


def test_customer_not_entitled(emulator: EmulatorProcess, pod_creds: PodCreds) -> None:
    client = metering(emulator, pod_creds(role=ROLE_NOT_ENTITLED))
    with pytest.raises(client.exceptions.CustomerNotEntitledException):
        client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)


def test_static_and_unknown_keys_are_not_a_supported_platform(emulator: EmulatorProcess) -> None:
    client = metering(emulator, static_creds())
    with pytest.raises(client.exceptions.PlatformNotSupportedException):
        client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)
    unknown = metering(emulator, {"aws_access_key_id": "AKIAUNKNOWN000000001", "aws_secret_access_key": "s"})
    with pytest.raises(unknown.exceptions.PlatformNotSupportedException):
        unknown.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)


@pytest.mark.parametrize(
    ("kwargs", "region", "expected"),
    [
        ({"ProductCode": "no-such-product", "PublicKeyVersion": 1}, None, "InvalidProductCodeException"),
        ({"ProductCode": HOURLY, "PublicKeyVersion": 7}, None, "InvalidPublicKeyVersionException"),
        ({"ProductCode": HOURLY, "PublicKeyVersion": 1}, "other-region-9", "InvalidRegionException"),
        ({"ProductCode": DISABLED, "PublicKeyVersion": 1}, None, "DisabledApiException"),
        ({"ProductCode": "bad code!", "PublicKeyVersion": 1}, None, "ValidationException"),
    ],
)
def test_modelled_errors(
    emulator: EmulatorProcess,
    pod_creds: PodCreds,
    kwargs: dict[str, object],
    region: str | None,
    expected: str,
) -> None:
    creds = pod_creds()
    client = metering(emulator, creds) if region is None else metering(emulator, creds, region=region)
    with pytest.raises(ClientError) as exc:
        client.register_usage(**kwargs)
    assert code_of(exc) == expected
    if expected == "InvalidPublicKeyVersionException":
        assert "configured versions: 1, 2" in exc.value.response["Error"]["Message"]
    if expected != "ValidationException":
        assert getattr(client.exceptions, expected) is type(exc.value), "boto3 maps it to the modelled class"


@pytest.mark.parametrize(
    ("fault", "expected", "status"),
    [
        ({"throttle_rate": 1.0}, "ThrottlingException", 400),
        ({"error_rate": 1.0}, "InternalServiceErrorException", 500),
        ({"fail_with": "DisabledApiException"}, "DisabledApiException", 400),
        ({"fail_all": True}, "InternalServiceErrorException", 500),
    ],
)
def test_injected_faults(
    emulator: EmulatorProcess, pod_creds: PodCreds, fault: dict[str, Any], expected: str, status: int
) -> None:
    client = metering(emulator, pod_creds())
    emulator.admin.set_fault("RegisterUsage", **fault)
    try:
        with pytest.raises(ClientError) as exc:
            client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)
    finally:
        emulator.admin.clear_faults()
    assert code_of(exc) == expected
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    events = emulator.admin.events(operation="RegisterUsage", error_code=expected)
    assert events[-1]["injected"] is True
    client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)  # cleared: works again


def test_role_without_permission_is_denied(
    emulator: EmulatorProcess, issuer: TestIssuer, pod_creds: PodCreds
) -> None:
    emulator.admin.put_role(
        {
            "arn": f"arn:aws:iam::{BUYER}:role/meter-only",
            "trust": [{"issuer": issuer.issuer, "subjects": ["*"]}],
            "allowedActions": ["aws-marketplace:MeterUsage"],
        }
    )
    client = metering(emulator, pod_creds(role=f"arn:aws:iam::{BUYER}:role/meter-only"))
    with pytest.raises(ClientError) as exc:
        client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1)
    assert code_of(exc) == "AccessDeniedException"
