"""Fixtures for the chart tests: the real Helm CLI, pointed at the local cluster when a test needs one."""

from __future__ import annotations

from pathlib import Path

import pytest
from devtools.cluster import ClusterInfo, bin_path

from tests.chart.helmcli import Helm


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    # Built with the control plane by devtools/build-control-plane.sh (cached per machine).
    return bin_path("helm")


@pytest.fixture(scope="session")
def helm(helm_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm for offline commands (lint, template): no cluster involved."""
    return Helm(binary=helm_binary, home=tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def cluster_helm(helm_binary: Path, cluster: ClusterInfo, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    """Helm with the local cluster's admin kubeconfig."""
    return Helm(
        binary=helm_binary, home=tmp_path_factory.mktemp("helm-cluster-home"), kubeconfig=cluster.kubeconfig
    )
