"""Timestamps in AWS answers: the operator's sessions parse ISO 8601 without dateutil, same results."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from botocore.utils import parse_timestamp

from metering_operator.aws.sessions import new_session, parse_aws_timestamp


def test_iso_times_parse_like_botocore() -> None:
    for text in (
        "2026-12-01T10:00:00Z",
        "2026-12-01T10:00:00.123Z",
        "2026-12-01T10:00:00.123456Z",
        "2026-12-01T12:00:00+02:00",
    ):
        ours, botocores = parse_aws_timestamp(text), parse_timestamp(text)
        assert ours == botocores, text
        assert ours.utcoffset() == botocores.utcoffset(), text
    assert parse_aws_timestamp("2026-12-01T12:00:00+02:00") == datetime(2026, 12, 1, 10, tzinfo=UTC)
    assert parse_aws_timestamp("2026-12-01T12:00:00+02:00").utcoffset() == timedelta(hours=2)


def test_other_forms_take_botocores_path() -> None:
    """Epoch seconds, RFC 822 and a time without an offset are left to botocore, as before."""
    for value in (1796119200, "1796119200", "Mon, 01 Dec 2026 10:00:00 GMT", "2026-12-01T10:00:00"):
        parsed = parse_aws_timestamp(value)
        assert parsed == parse_timestamp(value)
        assert parsed.tzinfo == parse_timestamp(value).tzinfo


def test_sessions_clients_parse_timestamps_with_it() -> None:
    """An STS answer parsed by a client of :func:`new_session`: Expiration is an aware datetime."""
    session = new_session()
    sts = session.client("sts", region_name="eu-test-1", aws_access_key_id="x", aws_secret_access_key="y")
    factory = session._session.get_component("response_parser_factory")
    parser = factory.create_parser("query")
    model = sts.meta.service_model.operation_model("AssumeRoleWithWebIdentity")
    body = (
        b"<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>"
        b"<AccessKeyId>AKIA</AccessKeyId><SecretAccessKey>s</SecretAccessKey><SessionToken>t</SessionToken>"
        b"<Expiration>2026-12-01T11:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult>"
        b"</AssumeRoleWithWebIdentityResponse>"
    )
    parsed = parser.parse({"status_code": 200, "headers": {}, "body": body}, model.output_shape)
    assert parsed["Credentials"]["Expiration"] == datetime(2026, 12, 1, 11, tzinfo=UTC)
    assert factory._defaults["timestamp_parser"] is parse_aws_timestamp
