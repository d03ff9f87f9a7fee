"""Pure parts of the IRSA adapter: role ARNs, session names, expiry arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from metering_operator.aws.irsa import WebIdentityCredentials, session_name_for_pod, validate_role_arn

NOW = datetime(2026, 11, 26, 4, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::123456789012:role/product-pods",
        "arn:aws-cn:iam::123456789012:role/path/to/role",
        "arn:aws-us-gov:iam::123456789012:role/a+b=c,d.e@f-g_h",
    ],
)
def test_role_arns_accepted(arn: str) -> None:
    assert validate_role_arn(arn) == arn


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "product-pods",
        "arn:aws:iam::12345:role/short-account",
        "arn:aws:iam::123456789012:user/not-a-role",
        "arn:aws:sts::123456789012:assumed-role/x/y",
        "arn:aws:iam::123456789012:role/",
    ],
)
def test_bad_role_arns_name_the_annotation(arn: str) -> None:
    with pytest.raises(ValueError, match=r"eks\.amazonaws\.com/role-arn"):
        validate_role_arn(arn)


def test_session_name_names_the_pod_within_sts_limits() -> None:
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    assert session_name_for_pod(uid) == f"mmo-{uid}"
    assert len(session_name_for_pod("x" * 200)) == 64
    assert session_name_for_pod("a b/c") == "mmo-a-b-c"


def creds(expiration: datetime) -> WebIdentityCredentials:
    return WebIdentityCredentials(
        access_key_id="ASIAEXAMPLE",
        secret_access_key="s3cr3t-value",
        session_token="t0ken-value",
        expiration=expiration,
        role_arn="arn:aws:iam::123456789012:role/r",
    )


def test_expires_within_margin() -> None:
    c = creds(NOW + timedelta(minutes=10))
    assert not c.expires_within(NOW, timedelta(minutes=5))
    assert c.expires_within(NOW, timedelta(minutes=10))
    assert c.expires_within(NOW + timedelta(minutes=6), timedelta(minutes=5))


def test_secrets_stay_out_of_repr() -> None:
    text = repr(creds(NOW))
    assert "ASIAEXAMPLE" in text
    assert "s3cr3t-value" not in text
    assert "t0ken-value" not in text
