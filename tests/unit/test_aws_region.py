"""Region resolution: explicit order, clear failure, never a default Region."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import boto3
import pytest

from metering_operator.aws.client import MeteringClient, MeteringClientFactory
from metering_operator.aws.irsa import WebIdentityExchanger
from metering_operator.aws.region import RegionError, resolve_region


@pytest.fixture
def no_aws_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment with no Region anywhere (empty config file, no variables)."""
    for variable in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(variable, raising=False)
    config = tmp_path / "config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    return config


def test_flag_wins_over_everything() -> None:
    env = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}
    assert resolve_region("ap-southeast-2", environ=env) == "ap-southeast-2"


def test_aws_region_wins_over_aws_default_region() -> None:
    env = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}
    assert resolve_region(None, environ=env) == "eu-west-1"


def test_aws_default_region_when_aws_region_is_blank() -> None:
    assert resolve_region(None, environ={"AWS_REGION": "  ", "AWS_DEFAULT_REGION": "us-gov-west-1"}) == (
        "us-gov-west-1"
    )


def test_session_config_is_the_last_resort(no_aws_config: Path) -> None:
    no_aws_config.write_text("[default]\nregion = eu-central-2\n")
    assert resolve_region(None, environ={}, session=boto3.Session()) == "eu-central-2"
    # Also when the session is created by resolve_region itself.
    assert resolve_region(None, environ={}) == "eu-central-2"


def test_no_region_anywhere_is_a_clear_error(no_aws_config: Path) -> None:
    with pytest.raises(RegionError, match="no AWS Region configured") as info:
        resolve_region(None, environ={})
    message = str(info.value)
    for place in ("--region", "AWS_REGION", "AWS_DEFAULT_REGION", "config"):
        assert place in message


@pytest.mark.parametrize("bad", ["aws-global", "EU-WEST-1", "eu west 1", "us-east", "1"])
def test_non_region_names_are_refused_with_their_source(bad: str) -> None:
    with pytest.raises(RegionError, match="AWS_REGION"):
        resolve_region(None, environ={"AWS_REGION": bad})
    with pytest.raises(RegionError, match="--region"):
        resolve_region(bad, environ={})


@pytest.mark.parametrize(
    ("build", "purpose"),
    [
        (lambda: MeteringClient.create(""), "the Metering client"),
        (lambda: MeteringClientFactory(""), "the Metering client factory"),
        (lambda: WebIdentityExchanger(""), "STS"),
    ],
)
def test_every_client_refuses_to_start_without_a_region(build: Callable[[], object], purpose: str) -> None:
    with pytest.raises(RegionError, match=f"a Region is required for {purpose};"):
        build()
