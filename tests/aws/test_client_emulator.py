"""The Metering client and IRSA exchange, end to end against the real emulator subprocess.

Everything goes through unmodified boto3 over HTTP: STS AssumeRoleWithWebIdentity with a token
signed by a local test issuer (its JWKS file is in the emulator config), then the Metering calls
signed with the credentials STS returned.
"""

from __future__ import annotations

import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import jwt
import pytest

from metering_operator import metrics
from metering_operator.aws.client import MeteringClientFactory, client_config
from metering_operator.aws.errors import ErrorCategory, MeteringError
from metering_operator.aws.irsa import IrsaCredentialCache, WebIdentityExchanger, pod_metering_client
from metering_operator.aws.models import (
    BatchMeterUsageRequest,
    MeterUsageRequest,
    RegisterUsageRequest,
    ResolveCustomerRequest,
    UsageRecord,
    UsageRecordResultStatus,
)
from metering_operator.domain.clock import ManualClock, hour_start
from tests.aws.conftest import (
    CUSTOM_PRODUCT,
    ENTITLED_ACCOUNT,
    ENTITLED_ROLE,
    HOURLY_PRODUCT,
    REGION,
    SAAS_CUSTOMER,
    SAAS_PRODUCT,
    UNENTITLED_ROLE,
    AwsWorld,
)
from tests.emulator.harness import TestIssuer


def error_count(operation: str, code: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "marketplace_metering_aws_call_errors_total", {"operation": operation, "code": code}
    )
    return value or 0.0


def latency_count(operation: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "marketplace_metering_aws_call_duration_seconds_count", {"operation": operation}
    )
    return value or 0.0


def closed_hour(world: AwsWorld) -> datetime:
    """The last full hour by the emulator's clock (what the operator would report)."""
    return hour_start(world.emulator.admin.clock()) - timedelta(hours=1)


def cpu_request(world: AwsWorld, **changes: Any) -> MeterUsageRequest:
    """MeterUsage of 1 cpu for the last closed hour, with ``changes`` applied (and validated)."""
    fields: dict[str, Any] = {
        "product_code": CUSTOM_PRODUCT,
        "timestamp": closed_hour(world),
        "usage_dimension": "cpu",
        "usage_quantity": 1,
    }
    return MeterUsageRequest(**(fields | changes))


# -- STS web identity -----------------------------------------------------------------------------


def test_irsa_exchange_returns_the_pods_session(world: AwsWorld) -> None:
    pod_uid = str(uuid.uuid4())
    creds = world.pod_credentials(ENTITLED_ROLE, pod_uid)
    assert creds.access_key_id
    assert creds.role_arn == ENTITLED_ROLE
    assert creds.expiration > datetime.now(UTC) + timedelta(minutes=10)
    assert creds.subject == "system:serviceaccount:shop:app"
    assert creds.secret_access_key not in repr(creds)
    assert creds.session_token not in repr(creds)
    issued = [c for c in world.emulator.admin.credentials() if c.get("accessKeyId") == creds.access_key_id]
    assert len(issued) == 1
    assert pod_uid in str(issued[0])


def test_irsa_exchange_strips_the_projected_files_newline(world: AwsWorld) -> None:
    uid = str(uuid.uuid4())
    token = world.pod_token(uid, trailing_newline=True)
    creds = world.exchanger.assume(ENTITLED_ROLE, token, session_name="mmo-newline")
    assert creds.access_key_id


def test_token_from_an_unknown_key_is_a_configuration_error(world: AwsWorld, tmp_path_factory) -> None:
    stranger = TestIssuer(tmp_path_factory.mktemp("stranger"), issuer=world.issuer.issuer)
    token = stranger.token("shop", "app", pod_uid=str(uuid.uuid4()))
    before = error_count("AssumeRoleWithWebIdentity", "InvalidIdentityToken")
    with pytest.raises(MeteringError) as info:
        world.exchanger.assume(ENTITLED_ROLE, token, session_name="mmo-stranger")
    assert info.value.code == "InvalidIdentityToken"
    assert info.value.category is ErrorCategory.CALLER_BUG
    assert error_count("AssumeRoleWithWebIdentity", "InvalidIdentityToken") == before + 1


def test_untrusted_service_account_is_refused(world: AwsWorld) -> None:
    token = world.issuer.token("other-namespace", "app", pod_uid=str(uuid.uuid4()))
    with pytest.raises(MeteringError) as info:
        world.exchanger.assume(ENTITLED_ROLE, token, session_name="mmo-untrusted")
    assert info.value.code == "AccessDenied"
    assert info.value.category is ErrorCategory.CALLER_BUG


def test_expired_token_is_retryable_with_a_new_token(world: AwsWorld) -> None:
    token = world.issuer.token(
        "shop", "app", issued_at=datetime.now(UTC) - timedelta(hours=2), lifetime_seconds=600
    )
    with pytest.raises(MeteringError) as info:
        world.exchanger.assume(ENTITLED_ROLE, token, session_name="mmo-expired")
    assert info.value.code == "ExpiredTokenException"
    assert info.value.retryable


def test_bad_role_arn_fails_before_any_call(world: AwsWorld) -> None:
    with pytest.raises(ValueError, match="not an IAM role ARN"):
        world.exchanger.assume("arn:aws:iam::1:user/x", "token", session_name="mmo-x")


def test_sts_endpoint_comes_from_aws_endpoint_url_sts(
    world: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", world.emulator.url)
    exchanger = WebIdentityExchanger(REGION)
    assert exchanger.endpoint_url == world.emulator.url
    uid = str(uuid.uuid4())
    creds = exchanger.assume(ENTITLED_ROLE, world.pod_token(uid), session_name="mmo-env")
    assert creds.access_key_id


def test_credential_cache_reuses_a_pods_session_until_near_expiry(world: AwsWorld) -> None:
    clock = ManualClock(datetime.now(UTC))
    cache = IrsaCredentialCache(world.exchanger, clock, margin=timedelta(minutes=5))
    uid_a, uid_b = str(uuid.uuid4()), str(uuid.uuid4())
    minted: list[str] = []

    def token_for(uid: str):
        def mint() -> str:
            minted.append(uid)
            return world.pod_token(uid)

        return mint

    first = cache.get(ENTITLED_ROLE, uid_a, token_for(uid_a))
    assert cache.get(ENTITLED_ROLE, uid_a, token_for(uid_a)) is first
    other = cache.get(ENTITLED_ROLE, uid_b, token_for(uid_b))
    assert other.access_key_id != first.access_key_id, "each pod must get its own session"
    assert minted == [uid_a, uid_b]
    assert cache.exchanges == 2
    # Inside the expiry margin the cached session is not handed out any more.
    clock.set(first.expiration - timedelta(minutes=4))
    renewed = cache.get(ENTITLED_ROLE, uid_a, token_for(uid_a))
    assert renewed.access_key_id != first.access_key_id
    assert minted == [uid_a, uid_b, uid_a]
    cache.invalidate(ENTITLED_ROLE, uid_b)
    assert len(cache) == 1


# -- RegisterUsage --------------------------------------------------------------------------------


def test_register_usage_signature_verifies_with_the_products_key(world: AwsWorld) -> None:
    pod_uid = str(uuid.uuid4())
    client = world.factory.for_credentials(world.pod_credentials(ENTITLED_ROLE, pod_uid))
    calls_before = latency_count("RegisterUsage")
    result = client.register_usage(
        RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce=pod_uid)
    )
    assert latency_count("RegisterUsage") == calls_before + 1
    assert result.public_key_rotation_timestamp is None
    assert jwt.get_unverified_header(result.signature)["alg"] == "PS256"
    public_key = world.emulator.admin.public_key_pem(HOURLY_PRODUCT, 1)
    claims = jwt.decode(result.signature, public_key, algorithms=["PS256"])
    assert claims["productCode"] == HOURLY_PRODUCT
    assert claims["publicKeyVersion"] == 1
    assert claims["nonce"] == pod_uid
    assert isinstance(claims["iat"], int)
    registrations = world.emulator.admin.registrations(HOURLY_PRODUCT)
    assert pod_uid in str(registrations)


def test_pod_clients_share_one_boto_client_and_each_call_signs_as_its_own_pod(world: AwsWorld) -> None:
    """Per-pod clients are views of one boto3 client signing each call with that pod's session.

    Calls from many threads at once, interleaved: the emulator attributes every registration to
    the session that signed it, so a call signed with another thread's credentials would show up
    as a registration whose nonce (this pod's uid) names a different pod than its identity.
    """
    uids = [str(uuid.uuid4()) for _ in range(12)]
    clients = {uid: world.factory.for_credentials(world.pod_credentials(ENTITLED_ROLE, uid)) for uid in uids}
    assert len({id(c.boto_client) for c in clients.values()}) == 1

    def register(uid: str) -> str:
        result = clients[uid].register_usage(
            RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce=uid)
        )
        return str(jwt.decode(result.signature, options={"verify_signature": False})["nonce"])

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(register, uids * 3)) == uids * 3
    rows = [r for r in world.emulator.admin.registrations(HOURLY_PRODUCT) if r["nonce"] in uids]
    assert sorted(r["identity"]["podUid"] for r in rows) == sorted(uids)
    assert all(r["identity"]["podUid"] == r["nonce"] and r["calls"] == 3 for r in rows)


def test_register_usage_through_cache_and_factory_helper(world: AwsWorld) -> None:
    pod_uid = str(uuid.uuid4())
    cache = IrsaCredentialCache(world.exchanger, ManualClock(datetime.now(UTC)))
    with pod_metering_client(
        cache, world.factory, ENTITLED_ROLE, pod_uid, lambda: world.pod_token(pod_uid)
    ) as client:
        result = client.register_usage(
            RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce=pod_uid)
        )
    assert cache.exchanges == 1
    assert jwt.decode(result.signature, options={"verify_signature": False})["nonce"] == pod_uid


def test_unentitled_account_is_denied(world: AwsWorld) -> None:
    client = world.pod_client(UNENTITLED_ROLE)
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert info.value.code == "CustomerNotEntitledException"
    assert info.value.denied
    assert info.value.operation == "RegisterUsage"


def test_static_keys_are_not_a_platform_for_register_usage(world: AwsWorld) -> None:
    client = world.static_client()
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert info.value.code == "PlatformNotSupportedException"
    assert info.value.category is ErrorCategory.DENIED


@pytest.mark.parametrize(
    ("product", "version", "code"),
    [
        ("produnknown1", 1, "InvalidProductCodeException"),
        (HOURLY_PRODUCT, 9, "InvalidPublicKeyVersionException"),
    ],
)
def test_register_usage_final_answers(world: AwsWorld, product: str, version: int, code: str) -> None:
    client = world.pod_client()
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=product, public_key_version=version))
    assert (info.value.code, info.value.category) == (code, ErrorCategory.DENIED)


def test_wrong_region_is_denied(world: AwsWorld) -> None:
    other = MeteringClientFactory("eu-other-2", endpoint_url=world.emulator.url)
    client = other.for_credentials(world.pod_credentials())
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert (info.value.code, info.value.category) == ("InvalidRegionException", ErrorCategory.DENIED)


def test_throttled_register_usage_is_retryable_and_not_retried_by_botocore(world: AwsWorld) -> None:
    client = world.pod_client()
    world.emulator.admin.set_fault("RegisterUsage", fail_with="ThrottlingException")
    events_before = len(world.emulator.admin.events(operation="RegisterUsage"))
    metric_before = error_count("RegisterUsage", "ThrottlingException")
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert info.value.code == "ThrottlingException"
    assert info.value.retryable
    # Exactly one attempt reached "AWS": the operator's own backoff owns retries.
    assert len(world.emulator.admin.events(operation="RegisterUsage")) == events_before + 1
    assert error_count("RegisterUsage", "ThrottlingException") == metric_before + 1


def test_botocore_retries_can_be_switched_back_on(world: AwsWorld) -> None:
    factory = MeteringClientFactory(
        REGION, endpoint_url=world.emulator.url, config=client_config(max_attempts=3)
    )
    client = factory.for_credentials(world.pod_credentials())
    world.emulator.admin.set_fault("RegisterUsage", fail_with="ThrottlingException")
    events_before = len(world.emulator.admin.events(operation="RegisterUsage"))
    with pytest.raises(MeteringError):
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert len(world.emulator.admin.events(operation="RegisterUsage")) == events_before + 3


def test_unreachable_endpoint_is_retryable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    factory = MeteringClientFactory(REGION, endpoint_url=f"http://127.0.0.1:{port}")
    client = factory.for_credentials(_UnusedKeys())
    with pytest.raises(MeteringError) as info:
        client.register_usage(RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1))
    assert info.value.code == "EndpointConnectionError"
    assert info.value.retryable


class _UnusedKeys:
    """Syntactically valid keys for a call that never reaches a server."""

    access_key_id = "ASIAUNUSED000000000"
    secret_access_key = "unused"
    session_token = "unused"


# -- MeterUsage -----------------------------------------------------------------------------------


def test_meter_usage_happy_path_replay_and_duplicate(world: AwsWorld) -> None:
    client = world.pod_client()
    hour = closed_hour(world)
    request = MeterUsageRequest(
        product_code=CUSTOM_PRODUCT, timestamp=hour, usage_dimension="replicas", usage_quantity=17
    )
    first = client.meter_usage(request)
    assert first.metering_record_id
    # The same value again (as a decimal, compared by value) is idempotent: same record.
    replay = client.meter_usage(
        MeterUsageRequest(
            product_code=CUSTOM_PRODUCT,
            timestamp=hour + timedelta(minutes=30),
            usage_dimension="replicas",
            usage_quantity_decimal=Decimal("17.000000"),
        )
    )
    assert replay.metering_record_id == first.metering_record_id
    with pytest.raises(MeteringError) as info:
        client.meter_usage(request.model_copy(update={"usage_quantity": 18}))
    assert info.value.code == "DuplicateRequestException"
    assert info.value.category is ErrorCategory.CALLER_BUG
    records = [
        r for r in world.emulator.admin.meter_records(CUSTOM_PRODUCT) if r.get("dimension") == "replicas"
    ]
    assert first.metering_record_id in str(records)


def test_meter_usage_decimal_and_allocations_are_accepted(world: AwsWorld) -> None:
    client = world.pod_client()
    request = MeterUsageRequest.model_validate(
        {
            "ProductCode": CUSTOM_PRODUCT,
            "Timestamp": closed_hour(world),
            "UsageDimension": "cpu",
            "UsageQuantityAsDecimal": "2.5",
            "UsageAllocations": [
                {"AllocatedUsageQuantityAsDecimal": "1.25", "Tags": [{"Key": "team", "Value": "a"}]},
                {"AllocatedUsageQuantityAsDecimal": "1.25", "Tags": [{"Key": "team", "Value": "b"}]},
            ],
        }
    )
    assert client.meter_usage(request).metering_record_id


def test_meter_usage_outside_the_window_is_out_of_window(world: AwsWorld) -> None:
    client = world.pod_client()
    stale = hour_start(world.emulator.admin.clock()) - timedelta(hours=7)
    with pytest.raises(MeteringError) as info:
        client.meter_usage(cpu_request(world, timestamp=stale))
    assert (info.value.code, info.value.category) == (
        "TimestampOutOfBoundsException",
        ErrorCategory.OUT_OF_WINDOW,
    )


def test_meter_usage_unknown_dimension_is_denied(world: AwsWorld) -> None:
    client = world.pod_client()
    with pytest.raises(MeteringError) as info:
        client.meter_usage(cpu_request(world, usage_dimension="gpus"))
    assert (info.value.code, info.value.category) == ("InvalidUsageDimensionException", ErrorCategory.DENIED)


def test_meter_usage_server_side_allocation_check_is_a_caller_bug(world: AwsWorld) -> None:
    # model_copy(update=...) skips our own validation, to prove the server's answer is classified too.
    client = world.pod_client()
    request = MeterUsageRequest.model_validate(
        {
            "ProductCode": CUSTOM_PRODUCT,
            "Timestamp": closed_hour(world),
            "UsageDimension": "cpu",
            "UsageQuantity": 3,
            "UsageAllocations": [{"AllocatedUsageQuantity": 3, "Tags": [{"Key": "team", "Value": "a"}]}],
        }
    )
    bad = request.model_copy(update={"usage_quantity": 4})  # model_copy does not re-validate
    with pytest.raises(MeteringError) as info:
        client.meter_usage(bad)
    assert (info.value.code, info.value.category) == (
        "InvalidUsageAllocationsException",
        ErrorCategory.CALLER_BUG,
    )


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ({"throttle_rate": 1.0}, "ThrottlingException", 400),
        ({"fail_with": "InternalServiceErrorException"}, "InternalServiceErrorException", 500),
    ],
)
def test_meter_usage_transient_errors_are_retryable_and_counted(
    world: AwsWorld, fault: dict[str, Any], code: str, status: int
) -> None:
    client = world.pod_client()
    world.emulator.admin.set_fault("MeterUsage", **fault)
    before = error_count("MeterUsage", code)
    with pytest.raises(MeteringError) as info:
        client.meter_usage(cpu_request(world))
    assert (info.value.code, info.value.http_status) == (code, status)
    assert info.value.retryable
    assert error_count("MeterUsage", code) == before + 1


def test_meter_usage_dry_run_is_a_result_not_an_error(world: AwsWorld) -> None:
    client = world.pod_client()
    before = len(world.emulator.admin.meter_records(CUSTOM_PRODUCT))
    result = client.meter_usage(cpu_request(world, usage_quantity=5, dry_run=True))
    assert result.dry_run is True
    assert result.metering_record_id is None
    assert len(world.emulator.admin.meter_records(CUSTOM_PRODUCT)) == before


def test_operator_identity_from_the_default_chain(world: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scope Cluster / MeterUsage: the operator's own credentials, endpoint from the environment."""
    uid = str(uuid.uuid4())
    token_file = world.emulator.state_dir.parent / f"token-{uid}"
    token_file.write_text(world.pod_token(uid, trailing_newline=True))
    for key, value in world.emulator.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ROLE_ARN", ENTITLED_ROLE)
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
    for variable in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    client = MeteringClientFactory(REGION).default()
    assert client.endpoint_url == world.emulator.url
    result = client.register_usage(
        RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce="kube-system-uid")
    )
    claims = jwt.decode(
        result.signature, world.emulator.admin.public_key_pem(HOURLY_PRODUCT, 1), algorithms=["PS256"]
    )
    assert claims["nonce"] == "kube-system-uid"


# -- BatchMeterUsage and ResolveCustomer (SaaS side, the seller's own static keys) ----------------


def test_resolve_customer_then_batch_meter(world: AwsWorld) -> None:
    client = world.static_client()
    token = world.emulator.admin.mint_registration_token(SAAS_PRODUCT, SAAS_CUSTOMER)
    customer = client.resolve_customer(ResolveCustomerRequest(registration_token=token))
    assert customer.customer_aws_account_id == SAAS_CUSTOMER
    assert customer.product_code == SAAS_PRODUCT

    hour = closed_hour(world)
    record = UsageRecord(
        timestamp=hour,
        dimension="users",
        quantity_decimal=Decimal("3.5"),
        customer_aws_account_id=SAAS_CUSTOMER,
    )
    stranger = record.model_copy(update={"customer_aws_account_id": ENTITLED_ACCOUNT})
    result = client.batch_meter_usage(
        BatchMeterUsageRequest(usage_records=[record, stranger], product_code=SAAS_PRODUCT)
    )
    statuses = {r.usage_record.customer_aws_account_id: r.status for r in result.results if r.usage_record}
    assert statuses == {
        SAAS_CUSTOMER: UsageRecordResultStatus.SUCCESS,
        ENTITLED_ACCOUNT: UsageRecordResultStatus.CUSTOMER_NOT_SUBSCRIBED,
    }
    assert result.unprocessed_records == ()
    duplicate = client.batch_meter_usage(
        BatchMeterUsageRequest(
            usage_records=[record.model_copy(update={"quantity_decimal": Decimal("4")})],
            product_code=SAAS_PRODUCT,
        )
    )
    assert duplicate.results[0].status is UsageRecordResultStatus.DUPLICATE_RECORD


def test_resolve_customer_bad_token_is_denied(world: AwsWorld) -> None:
    client = world.static_client()
    with pytest.raises(MeteringError) as info:
        client.resolve_customer(ResolveCustomerRequest(registration_token="not-a-token"))
    assert (info.value.code, info.value.category) == ("InvalidTokenException", ErrorCategory.DENIED)


def test_batch_meter_usage_out_of_window_rejects_the_batch(world: AwsWorld) -> None:
    client = world.static_client()
    stale = hour_start(world.emulator.admin.clock()) - timedelta(hours=30)
    with pytest.raises(MeteringError) as info:
        client.batch_meter_usage(
            BatchMeterUsageRequest(
                usage_records=[
                    UsageRecord(
                        timestamp=stale, dimension="users", quantity=1, customer_aws_account_id=SAAS_CUSTOMER
                    )
                ],
                product_code=SAAS_PRODUCT,
            )
        )
    assert (info.value.code, info.value.category) == (
        "TimestampOutOfBoundsException",
        ErrorCategory.OUT_OF_WINDOW,
    )


def test_one_off_client_from_credentials(world: AwsWorld) -> None:
    pod_uid = str(uuid.uuid4())
    creds = world.pod_credentials(ENTITLED_ROLE, pod_uid)
    with creds.metering_client(REGION, endpoint_url=world.emulator.url) as client:
        assert client.region == REGION
        result = client.register_usage(
            RegisterUsageRequest(product_code=HOURLY_PRODUCT, public_key_version=1, nonce=pod_uid)
        )
    assert jwt.decode(result.signature, options={"verify_signature": False})["nonce"] == pod_uid
