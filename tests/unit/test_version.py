"""One version: pyproject.toml, read through the installed metadata, everywhere a version is shown.

The chart's `version`/`appVersion`, the image label (tests/image checks the built image too) and
`metering-operator --version` must all say the package's version, and the licence the package
declares must be the LICENSE file shipped beside it.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from metering_operator import __version__

REPO = Path(__file__).resolve().parents[2]


def test_package_version_is_pyprojects() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert __version__ == project["version"]


def test_chart_version_and_app_version_match_the_package() -> None:
    chart = yaml.safe_load((REPO / "charts/marketplace-metering-operator/Chart.yaml").read_text())
    assert chart["appVersion"] == __version__
    assert chart["version"] == __version__


def test_cli_prints_the_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "metering_operator.cli", "--version"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    assert done.stdout.strip() == f"metering-operator {__version__}"


def test_license_is_the_apache_2_text_pyproject_declares() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
