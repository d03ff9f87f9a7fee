"""SigV4 as AWS enforces it: a signature is good for 15 minutes either side of its X-Amz-Date.

The caller's clock is moved by replacing botocore's ``get_current_datetime`` in this test
process only (the one way to have an SDK sign "20 minutes ago" without changing the machine's
time); the request still travels over HTTP to the real emulator process, which judges it by the
wall clock, not by its settable business clock.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterator

import boto3
import botocore.auth
import pytest
from botocore.exceptions import ClientError

from tests.emulator.conftest import CUSTOM, NO_RETRY, REGION, clock_fixed_at, code_of, metering, static_creds
from tests.emulator.harness import EmulatorProcess

PodCreds = Callable[..., dict[str, str]]


@pytest.fixture
def caller_clock_off_by(monkeypatch: pytest.MonkeyPatch) -> Callable[[dt.timedelta], None]:
    def shift(offset: dt.timedelta) -> None:
        monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: dt.datetime.now(dt.UTC) + offset)

    return shift


@pytest.fixture(autouse=True)
def far_business_clock(emulator: EmulatorProcess) -> Iterator[None]:
    # Years away from real time: proves the freshness check reads the wall clock.
    with clock_fixed_at(emulator, dt.datetime(2035, 1, 1, 12, 30, tzinfo=dt.UTC)):
        yield


def meter_once(client: object) -> None:
    client.meter_usage(  # type: ignore[attr-defined]
        ProductCode=CUSTOM,
        Timestamp=dt.datetime(2035, 1, 1, 11, 0, tzinfo=dt.UTC),
        UsageDimension="replicas",
        UsageQuantity=1,
    )


@pytest.mark.parametrize(
    ("offset", "message"),
    [
        (dt.timedelta(minutes=-20), "Signature expired"),
        (dt.timedelta(minutes=20), "Signature not yet current"),
    ],
)
def test_metering_refuses_a_stale_or_future_signature(
    emulator: EmulatorProcess,
    pod_creds: PodCreds,
    caller_clock_off_by: Callable[[dt.timedelta], None],
    offset: dt.timedelta,
    message: str,
) -> None:
    client = metering(emulator, pod_creds(pod_uid=str(uuid.uuid4())))
    caller_clock_off_by(offset)
    with pytest.raises(ClientError) as exc:
        meter_once(client)
    assert code_of(exc) == "InvalidSignatureException"
    assert message in exc.value.response["Error"]["Message"]
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_a_skew_within_fifteen_minutes_is_accepted(
    emulator: EmulatorProcess, pod_creds: PodCreds, caller_clock_off_by: Callable[[dt.timedelta], None]
) -> None:
    client = metering(emulator, pod_creds(pod_uid=str(uuid.uuid4())))
    caller_clock_off_by(dt.timedelta(minutes=-10))
    meter_once(client)
    caller_clock_off_by(dt.timedelta(minutes=10))
    meter_once(client)  # the same hour and quantity again: idempotent, so it must succeed


def test_static_keys_and_sts_get_the_same_check(
    emulator: EmulatorProcess, caller_clock_off_by: Callable[[dt.timedelta], None]
) -> None:
    client = metering(emulator, static_creds())
    sts = boto3.client(
        "sts", endpoint_url=emulator.url, region_name=REGION, config=NO_RETRY, **static_creds()
    )
    caller_clock_off_by(dt.timedelta(hours=-1))
    with pytest.raises(ClientError) as exc:
        meter_once(client)
    assert code_of(exc) == "InvalidSignatureException"
    with pytest.raises(ClientError) as exc:
        sts.get_caller_identity()
    assert code_of(exc) == "SignatureDoesNotMatch"
    assert "Signature expired" in exc.value.response["Error"]["Message"]
