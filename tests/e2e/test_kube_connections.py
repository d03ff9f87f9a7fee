"""The operator's Kubernetes writes hand their connection back to the pool.

A raw (``_preload_content=False``) response left unread keeps its connection out of the pool, so
the next request opens and TLS-handshakes a new one. Before this was fixed the gate paid one
handshake per granted pod (its ``Registered`` Event); the profile in bench/results showed it.
Counted here with urllib3's own per-pool connection counter against the real API server.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from metering_operator.kube.events import EventPoster
from metering_operator.kube.pods import PodApi, PodGone, is_conflict
from metering_operator.kube.records import DenialRecords
from metering_operator.kube.tokens import request_pod_token


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


def test_raw_pod_calls_reuse_one_connection_and_raise_the_clients_errors(
    cluster: ClusterInfo, namespace: str
) -> None:
    """The gate's per-pod calls sent as raw JSON (kube/rawapi.py): TokenRequest, the guarded JSON
    patch and its conflict, a missing pod, all on one pooled connection."""
    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    api.configuration.connection_pool_maxsize = 4
    try:
        core = client.CoreV1Api(api)
        pod = {"metadata": {"name": "raw"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        created = core.create_namespaced_pod(namespace, pod)
        pods = PodApi(api)
        token = request_pod_token(
            api,
            namespace=namespace,
            service_account="default",
            pod_name="raw",
            pod_uid=created.metadata.uid,
            raw=pods.raw,
        )
        assert token.count(".") == 2  # a JWT
        annotate = {"op": "add", "path": "/metadata/annotations", "value": {"a": "1"}}
        for _ in range(10):  # the scheduler may write the new pod between our read and our patch
            stale = pods.get(namespace, "raw")["metadata"]["resourceVersion"]
            guard = {"op": "test", "path": "/metadata/resourceVersion", "value": stale}
            try:
                patched = pods.json_patch(namespace, "raw", [guard, annotate])
                break
            except ApiException as exc:
                if not is_conflict(exc):
                    raise
        assert patched["metadata"]["annotations"] == {"a": "1"}
        assert pods.get(namespace, "raw")["metadata"]["resourceVersion"] != stale
        with pytest.raises(ApiException) as conflict:
            pods.json_patch(namespace, "raw", [guard])
        assert is_conflict(conflict.value)
        assert json.loads(conflict.value.body)["code"] == conflict.value.status
        with pytest.raises(PodGone):
            pods.json_patch(namespace, "missing", [{"op": "add", "path": "/metadata/labels", "value": {}}])
        with pytest.raises(PodGone):
            pods.get(namespace, "missing")
        assert pods.pod_writes >= 3
        assert _connections(api) == 1
    finally:
        api.close()
