"""Resolve the AWS Region the operator runs in, explicitly, and never fall back on a default.

RegisterUsage must be called in the Region the cluster runs in (``InvalidRegionException``
otherwise), so a silently assumed ``us-east-1`` would deny every pod of a buyer elsewhere. Order:
the ``--region`` flag, ``AWS_REGION`` (set by EKS's IRSA webhook; botocore 1.44 ignores it),
``AWS_DEFAULT_REGION``, then whatever the boto3 session's configuration says (profile / config
file). Nothing found is an error naming every place looked at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Protocol

# Real Regions look like us-east-1, us-gov-west-1, eu-central-2, ap-southeast-5; test setups may
# use made-up names of the same form. Pseudo-regions such as "aws-global" are refused.
_REGION_RE = re.compile(r"^[a-z]{2,}(-[a-z0-9]+)*-[0-9]+$")


class RegionError(ValueError):
    """No Region could be resolved, or the one given is not a Region name."""


class _HasRegion(Protocol):
    @property
    def region_name(self) -> str | None: ...


def require_region(region: str | None, purpose: str) -> str:
    """``region``, or a :class:`RegionError` saying what needed one (there is never a default)."""
    if not region:
        raise RegionError(
            f"a Region is required for {purpose}; resolve it with metering_operator.aws.region.resolve_region"
        )
    return region


def validate_region(region: str, source: str) -> str:
    candidate = region.strip()
    if not _REGION_RE.match(candidate):
        raise RegionError(f"{source}={region!r} is not an AWS Region name (expected e.g. 'eu-west-1')")
    return candidate


def resolve_region(
    flag: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    session: _HasRegion | None = None,
) -> str:
    """The Region to call AWS in. ``session`` is a ``boto3.Session`` (consulted last).

    Raises :class:`RegionError` if no source names a Region, or the first source that does
    names something that is not a Region.
    """
    env = os.environ if environ is None else environ
    if flag:
        return validate_region(flag, "--region")
    for variable in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        value = env.get(variable, "")
        if value.strip():
            return validate_region(value, variable)
    if session is None:
        import boto3  # imported late: only needed when flag and environment are silent

        session = boto3.Session()
    configured = session.region_name
    if configured:
        return validate_region(configured, "the AWS config file's region")
    raise RegionError(
        "no AWS Region configured: pass --region, or set AWS_REGION or AWS_DEFAULT_REGION, or a "
        "region in the AWS config profile. The operator never assumes a default Region, because "
        "RegisterUsage must run in the Region of the cluster."
    )
