"""The operator's Kubernetes writes hand their connection back to the pool.

A raw (``_preload_content=False``) response left unread keeps its connection out of the pool, so
the next request opens and TLS-handshakes a new one. Before this was fixed the gate paid one
handshake per granted pod (its ``Registered`` Event); the profile in bench/results showed it.
Counted here with urllib3's own per-pool connection counter against the real API server.
"""

from __future__ import annotations

from datetime import UTC, datetime

from devtools.cluster import ClusterInfo
from kubernetes import client, config

from metering_operator.kube.events import EventPoster
from metering_operator.kube.records import DenialRecords


def _connections(api: client.ApiClient) -> int:
    pool = api.rest_client.pool_manager.connection_from_url(api.configuration.host)
    return int(pool.num_connections)


def test_events_and_denial_records_reuse_one_connection(cluster: ClusterInfo, namespace: str) -> None:
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    api.configuration.connection_pool_maxsize = 4
    try:
        events = EventPoster(api)
        records = DenialRecords(api, namespace)
        ref = {"kind": "Pod", "apiVersion": "v1", "name": "p", "namespace": namespace, "uid": "u-0"}
        for i in range(10):
            events.post(ref, "Normal", "Registered", f"event {i}")
            records.add(namespace, "product", f"uid-{i}", f"pod-{i}", "denied", datetime.now(UTC))
        assert events.posted == 10
        listed = client.CoreV1Api(api).list_namespaced_event(namespace).items
        assert len(listed) == 10
        # One thread, one request at a time: every request after the first reuses its connection.
        assert _connections(api) == 1
    finally:
        api.close()
