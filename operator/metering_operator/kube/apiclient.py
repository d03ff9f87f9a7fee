"""The one way the operator builds its Kubernetes ApiClient.

In-cluster service-account config when running in a pod, the kubeconfig otherwise (local runs,
tests). The connection pool is sized by the caller: the gate's worker threads and the metering
informers each hold a connection at once, and urllib3 would otherwise drop (and log) the extra
ones.
"""

from __future__ import annotations

from typing import Any

from kubernetes import client, config


def new_api_client(pool_size: int) -> client.ApiClient:
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def release(response: Any) -> None:
    """Read a raw (``_preload_content=False``) response to its end, which hands its connection
    back to the pool. Left unread, the connection is never reused: the next request opens (and
    TLS-handshakes) a new one, which cost about one handshake per gated pod before."""
    response.read()
    response.release_conn()
