"""Cluster-wide fixtures: the real local control plane and clients for it.

Only what every area shares lives here; areas add their own fixtures in
``tests/<area>/conftest.py``. Tests that use these fixtures are marked ``@pytest.mark.cluster``.

The cluster (devtools/cluster.py) is started once per session, or joined if one is already
running (``make cluster``, or a parallel test session). At the end a session stops it only if
a test session started it and no other live session still uses it; ``MMO_KEEP_CLUSTER=1``
keeps it running for the next session, which then starts in a second.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from devtools.cluster import ClusterInfo, LocalCluster
from kubernetes import client, config
from kubernetes.client.rest import ApiException

# Namespace creation is cheap, but its `default` ServiceAccount comes from the controller
# manager's loop; allow for a busy 2-core machine.
_NAMESPACE_READY_TIMEOUT = 60.0


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterInfo]:
    """The running local cluster (started here, or joined)."""
    local = LocalCluster()
    info, _started_here = local.acquire(os.getpid())
    try:
        yield info
    finally:
        local.release(os.getpid(), keep=os.environ.get("MMO_KEEP_CLUSTER") == "1")


@pytest.fixture(scope="session")
def kube(cluster: ClusterInfo) -> Iterator[client.ApiClient]:
    """An ApiClient for the local cluster as cluster admin, built from its kubeconfig.

    Built explicitly rather than through ``config.load_kube_config()`` so nothing in the suite
    can silently talk to whatever cluster the global default configuration points at.
    """
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    try:
        yield api
    finally:
        api.close()


@contextmanager
def temporary_namespace(kube: client.ApiClient, prefix: str = "t-") -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists (pods need it); deleted afterwards."""
    core = client.CoreV1Api(kube)
    ns = core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(generate_name=prefix, labels={"mmo.test/temporary": "true"})
        )
    )
    name: str = ns.metadata.name
    deadline = time.monotonic() + _NAMESPACE_READY_TIMEOUT
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            break
        except ApiException as err:
            if err.status != 404:
                raise
        if time.monotonic() > deadline:
            core.delete_namespace(name)
            raise TimeoutError(
                f"namespace {name}: no `default` ServiceAccount after {_NAMESPACE_READY_TIMEOUT:.0f}s "
                "(is kube-controller-manager running? see .local/cluster/logs)"
            )
        time.sleep(0.1)
    try:
        yield name
    finally:
        try:
            core.delete_namespace(name, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                raise


@pytest.fixture
def namespace(kube: client.ApiClient) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists; deleted afterwards."""
    with temporary_namespace(kube) as name:
        yield name
