"""Kubernetes operator for AWS Marketplace RegisterUsage gating and hourly MeterUsage metering."""

from importlib.metadata import PackageNotFoundError, version

try:
    # One version source: pyproject.toml, as the installed distribution's metadata reports it.
    # tests/unit/test_version.py checks the chart and the image label against it.
    __version__ = version("marketplace-metering-operator")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0.0.0+unknown"
