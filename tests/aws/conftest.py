"""Fixtures for the AWS adapter's integration tests: one real emulator subprocess per module.

The emulator is started through tests/emulator/harness.py (owned by the emulator's authors);
boto3 talks to it over HTTP with nothing stubbed. Tests share the process per module (starting
it costs about a second of CPU) and keep out of each other's way with fresh pod uids.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest

from metering_operator.aws.client import MeteringClient, MeteringClientFactory
from metering_operator.aws.irsa import WebIdentityCredentials, WebIdentityExchanger, session_name_for_pod
from tests.emulator.harness import EmulatorProcess, TestIssuer, start_emulator

# Made-up but well-formed: nothing in the adapter may depend on a particular Region.
REGION = "eu-test-1"
ENTITLED_ACCOUNT = "111111111111"
UNENTITLED_ACCOUNT = "222222222222"
HOURLY_PRODUCT = "prodhourly1test"
CUSTOM_PRODUCT = "prodcustom1test"
SAAS_PRODUCT = "prodsaas1test"
NAMESPACE = "shop"
SERVICE_ACCOUNT = "app"
ENTITLED_ROLE = f"arn:aws:iam::{ENTITLED_ACCOUNT}:role/product-pods"
UNENTITLED_ROLE = f"arn:aws:iam::{UNENTITLED_ACCOUNT}:role/product-pods"
STATIC_KEY_ID = "AKIASAASSELLER00001"
STATIC_SECRET = "saas-seller-secret"
SAAS_CUSTOMER = "333333333333"


def emulator_config(issuer: TestIssuer) -> dict[str, Any]:
    trust = [{"issuer": issuer.issuer, "subjects": [f"system:serviceaccount:{NAMESPACE}:*"]}]
    return {
        "region": REGION,
        "products": [
            {"productCode": HOURLY_PRODUCT, "publicKeyVersions": [1], "entitledAccounts": [ENTITLED_ACCOUNT]},
            {
                "productCode": CUSTOM_PRODUCT,
                "dimensions": ["replicas", "cpu"],
                "entitledAccounts": [ENTITLED_ACCOUNT],
            },
            {
                "productCode": SAAS_PRODUCT,
                "dimensions": ["users"],
                "customers": [{"awsAccountId": SAAS_CUSTOMER}],
                "entitledAccounts": [SAAS_CUSTOMER],
            },
        ],
        "roles": [
            {"arn": ENTITLED_ROLE, "trust": trust},
            {"arn": UNENTITLED_ROLE, "trust": trust},
        ],
        "issuers": [issuer.issuer_config()],
        "staticCredentials": [
            {
                "accessKeyId": STATIC_KEY_ID,
                "secretAccessKey": STATIC_SECRET,
                "arn": "arn:aws:iam::444444444444:user/saas-seller",
            }
        ],
    }


@dataclass
class AwsWorld:
    emulator: EmulatorProcess
    issuer: TestIssuer
    exchanger: WebIdentityExchanger
    factory: MeteringClientFactory

    def pod_token(self, pod_uid: str, *, service_account: str = SERVICE_ACCOUNT, **kwargs: Any) -> str:
        return self.issuer.token(
            NAMESPACE, service_account, pod_name=f"pod-{pod_uid[:8]}", pod_uid=pod_uid, **kwargs
        )

    def pod_credentials(
        self, role_arn: str = ENTITLED_ROLE, pod_uid: str | None = None
    ) -> WebIdentityCredentials:
        uid = pod_uid or str(uuid.uuid4())
        return self.exchanger.assume(role_arn, self.pod_token(uid), session_name=session_name_for_pod(uid))

    def pod_client(self, role_arn: str = ENTITLED_ROLE) -> MeteringClient:
        """A Metering client signing as a fresh pod (its own IRSA session)."""
        return self.factory.for_credentials(self.pod_credentials(role_arn))

    def static_client(self) -> MeteringClient:
        """A Metering client with the SaaS seller's long-term keys (BatchMeterUsage, ResolveCustomer)."""
        session = boto3.Session(
            aws_access_key_id=STATIC_KEY_ID, aws_secret_access_key=STATIC_SECRET, region_name=REGION
        )
        return MeteringClient.create(REGION, session=session, endpoint_url=self.emulator.url)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AwsWorld]:
    base: Path = tmp_path_factory.mktemp("aws")
    issuer = TestIssuer(base / "issuer")
    emulator = start_emulator(emulator_config(issuer), base / "state")
    try:
        yield AwsWorld(
            emulator=emulator,
            issuer=issuer,
            exchanger=WebIdentityExchanger(REGION, endpoint_url=emulator.url),
            factory=MeteringClientFactory(REGION, endpoint_url=emulator.url),
        )
    finally:
        code = emulator.stop()
        assert code == 0 or code == -15, f"emulator exited with {code}:\n{emulator.log()[-4000:]}"


@pytest.fixture(autouse=True)
def _no_faults_left(world: AwsWorld) -> Iterator[None]:
    yield
    world.emulator.admin.clear_faults()
