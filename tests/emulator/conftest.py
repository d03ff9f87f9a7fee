"""Fixtures: one real emulator process per test module, a local OIDC issuer, boto3 clients.

Everything goes over HTTP through unmodified boto3; nothing in botocore is stubbed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.emulator.harness import EmulatorProcess, TestIssuer, start_emulator, web_identity_credentials

# Not a real AWS Region on purpose: the emulator must not care which Region, only that it matches.
REGION = "local-test-1"
BUYER = "111122223333"
NOT_ENTITLED = "444455556666"
ROLE = f"arn:aws:iam::{BUYER}:role/metering"
ROLE_NO_METER = f"arn:aws:iam::{BUYER}:role/register-only"
ROLE_NOT_ENTITLED = f"arn:aws:iam::{NOT_ENTITLED}:role/metering"
HOURLY = "hourlyprod1"
CUSTOM = "customprod1"
DISABLED = "disabledprod1"
LICENSE = f"arn:aws:license-manager::{BUYER}:license/l-0123456789"
STATIC_KEY = "AKIAEMULATORSTATIC01"
STATIC_SECRET = "static-secret-for-tests"
NAMESPACE = "shop"
# License Manager: AWS Marketplace's issuer (the fingerprint AWS's seller guide names) and contracts.
MARKETPLACE_FINGERPRINT = "aws:294406891311:AWS/Marketplace:issuer-fingerprint"
NO_KEY_FINGERPRINT = "aws:999988887777:NoKeyIssuer:issuer-fingerprint"
CONTRACT_SKU = "prod-contract1"
CONTRACT_LICENSE = "arn:aws:license-manager::294406891311:license:l-0a1b2c3d4e5f60718293a4b5c6d7e8f9"
EXPIRED_SKU = "prod-expired1"
PENDING_SKU = "prod-pending1"
NO_KEY_SKU = "prod-nokey1"
FAR_SKU = "prod-far1"
OTHER_REGION = "other-region-9"
OTHER_BUYER_LICENSE = "arn:aws:license-manager::294406891311:license:l-ffffffffffffffffffffffffffffffff"


def _license(suffix: str, sku: str, **changes: Any) -> dict[str, Any]:
    return {
        "licenseArn": f"arn:aws:license-manager::294406891311:license:l-{suffix * 32}",
        "productSKU": sku,
        "buyerAccount": BUYER,
        "entitlements": [{"name": "seats", "unit": "Count", "maxCount": 3}],
        **changes,
    }


def license_config() -> list[dict[str, Any]]:
    """The contracts of the emulator tests: one live one with seats, and one per refusal."""
    return [
        {
            "licenseArn": CONTRACT_LICENSE,
            "productSKU": CONTRACT_SKU,
            "productName": "Shop contract",
            "buyerAccount": BUYER,
            "entitlements": [
                {"name": "seats", "unit": "Count", "maxCount": 3},
                {"name": "premium", "unit": "None"},
                {"name": "storage", "unit": "Gigabytes", "maxCount": 100, "overage": True},
                {"name": "pinned", "unit": "Count", "maxCount": 5, "allowCheckIn": False},
            ],
        },
        _license("1", EXPIRED_SKU, validUntil="2001-01-01T00:00:00Z"),
        _license("2", PENDING_SKU, receivedStatus="PENDING_ACCEPT"),
        _license(
            "3",
            NO_KEY_SKU,
            issuer={"name": "NoKeyIssuer", "keyFingerprint": NO_KEY_FINGERPRINT, "signatureMethod": "None"},
        ),
        _license("4", FAR_SKU, homeRegion=OTHER_REGION),
        {
            **_license("f", CONTRACT_SKU),
            "licenseArn": OTHER_BUYER_LICENSE,
            "buyerAccount": NOT_ENTITLED,
            "entitlements": [{"name": "premium", "unit": "None"}],
        },
    ]


NO_RETRY = Config(retries={"total_max_attempts": 1, "mode": "standard"})


def base_config(issuer: TestIssuer) -> dict[str, Any]:
    trust = [{"issuer": issuer.issuer, "subjects": [f"system:serviceaccount:{NAMESPACE}:*"]}]
    return {
        "region": REGION,
        "issuers": [issuer.issuer_config()],
        "roles": [
            {"arn": ROLE, "trust": trust},
            {"arn": ROLE_NO_METER, "trust": trust, "allowedActions": ["aws-marketplace:RegisterUsage"]},
            {"arn": ROLE_NOT_ENTITLED, "trust": trust},
        ],
        "products": [
            {
                "productCode": HOURLY,
                "publicKeyVersions": [1, {"version": 2, "expiresAt": "2001-01-01T00:00:00Z"}],
                "entitledAccounts": [BUYER],
                "hourlyPrice": 0.36,
            },
            {
                "productCode": CUSTOM,
                "dimensions": [{"name": "replicas", "price": 0.1}, "cpu"],
                "entitledAccounts": [BUYER],
                "customers": [
                    {"awsAccountId": BUYER, "customerIdentifier": "cust-buyer", "licenseArn": LICENSE},
                    {"awsAccountId": NOT_ENTITLED, "customerIdentifier": "cust-unsubscribed"},
                ],
            },
            {"productCode": DISABLED, "disabled": True, "entitledAccounts": [BUYER]},
        ],
        "staticCredentials": [
            {
                "accessKeyId": STATIC_KEY,
                "secretAccessKey": STATIC_SECRET,
                "arn": f"arn:aws:iam::{BUYER}:user/seller",
            }
        ],
        "registrationTokens": [
            {
                "token": "config-token-1",
                "productCode": CUSTOM,
                "customerAWSAccountId": BUYER,
                "customerIdentifier": "cust-buyer",
                "licenseArn": LICENSE,
            },
            {
                "token": "config-token-expired",
                "productCode": CUSTOM,
                "customerAWSAccountId": BUYER,
                "expiresAt": "2001-01-01T00:00:00Z",
            },
            {"token": "config-token-disabled", "productCode": DISABLED, "customerAWSAccountId": BUYER},
        ],
        "licenses": license_config(),
    }


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> TestIssuer:
    return TestIssuer(tmp_path_factory.mktemp("issuer"))


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer) -> Iterator[EmulatorProcess]:
    emu = start_emulator(base_config(issuer), tmp_path_factory.mktemp("emu") / "state")
    try:
        yield emu
    finally:
        rc = emu.stop()
        assert rc == 0, f"emulator exited with {rc}:\n{emu.log()}"
        # A traceback in the log means some input reached an unexpected code path.
        assert "Traceback" not in emu.log(), emu.log()


def metering(emulator: EmulatorProcess, creds: dict[str, str], region: str = REGION) -> Any:
    return boto3.client(
        "meteringmarketplace", endpoint_url=emulator.url, region_name=region, config=NO_RETRY, **creds
    )


def license_manager(emulator: EmulatorProcess, creds: dict[str, str], region: str = REGION) -> Any:
    """An unmodified boto3 License Manager client talking to the emulator."""
    return boto3.client(
        "license-manager", endpoint_url=emulator.url, region_name=region, config=NO_RETRY, **creds
    )


def static_creds() -> dict[str, str]:
    return {"aws_access_key_id": STATIC_KEY, "aws_secret_access_key": STATIC_SECRET}


def code_of(exc: pytest.ExceptionInfo[ClientError]) -> str:
    """The AWS error code boto3 parsed from the answer."""
    return str(exc.value.response["Error"]["Code"])


@contextmanager
def clock_fixed_at(emulator: EmulatorProcess, now: dt.datetime) -> Iterator[None]:
    """The emulator's clock at ``now`` (so hours and windows are predictable), and no faults left after."""
    emulator.admin.set_clock(now)
    try:
        yield
    finally:
        emulator.admin.reset_clock()
        emulator.admin.clear_faults()


@pytest.fixture
def pod_creds(emulator: EmulatorProcess, issuer: TestIssuer) -> Callable[..., dict[str, str]]:
    """IRSA credentials for a fresh pod (own uid) of service account shop/app under ``role``."""

    def make(role: str = ROLE, pod_uid: str | None = None, service_account: str = "app") -> dict[str, str]:
        uid = pod_uid or str(uuid.uuid4())
        token = issuer.token(NAMESPACE, service_account, pod_name=f"pod-{uid[:8]}", pod_uid=uid)
        return web_identity_credentials(emulator, role, token, region=REGION)

    return make
