"""JSON requests to the API server over the ``kubernetes`` client's own connections and credentials.

The gate makes three API calls per pod (TokenRequest, the pod's JSON patch, its ``Registered``
Event). Through the generated API (``CoreV1Api.create_namespaced_event`` ...) each one first
walks the client's per-call machinery: keyword validation, ``sanitize_for_serialization`` of the
body, parameter tuples, header selection, a content-type regex and ``PoolManager.request``'s URL
handling; about a fifth of the call's CPU, measured against the same request sent here (0.79 vs
0.62 ms per Event on the local cluster; bench/results/entitlement.md). This module sends the
same request with the same pool (TLS settings, client certificates, proxy), the same default
headers and the same authentication (``update_params_for_auth``, which runs the in-cluster
token refresh hook), and raises the same :class:`ApiException` on an error status, so callers
keep their ``exc.status`` handling.

Blocking, like the sync client: call it from worker threads, never on kopf's event loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException

JSON = "application/json"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
#: The client's own auth setting for the API server (bearer token or client certificate).
_AUTH_SETTINGS = ["BearerToken"]


def segment(value: str) -> str:
    """One path segment (a namespace or object name), escaped."""
    return quote(value, safe="")


class RawApi:
    """Sends JSON to and reads JSON from the API server of one ``ApiClient``."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._host = api.configuration.host.rstrip("/")
        #: The path the server's URL may carry before ``/api`` (an API proxy's prefix).
        self._prefix = urlsplit(self._host).path
        self._lock = threading.Lock()
        self._pool: urllib3.HTTPConnectionPool | None = None

    def _connection_pool(self) -> urllib3.HTTPConnectionPool | None:
        """The pool manager's pool for the API server, kept: looking it up by URL on every call
        (``PoolManager.urlopen``: URL parsing, pool key) was a sixth of the request's CPU. None
        behind a proxy, whose requests go through the manager with the full URL."""
        manager = self._api.rest_client.pool_manager
        if isinstance(manager, urllib3.ProxyManager):
            return None
        pool = self._pool
        if pool is None or pool.pool is None:  # not looked up yet, or closed (evicted, client closed)
            with self._lock:
                pool = self._pool = manager.connection_from_url(self._host)
        return pool

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        query: Mapping[str, str] | None = None,
    ) -> bytes:
        """The response body of ``method path`` (``path`` starts with ``/api`` or ``/apis``);
        :class:`ApiException` with the status, reason, headers and body when the status is not 2xx."""
        return self.exchange(method, path, body, content_type=content_type, query=query)[0]

    def exchange(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        query: Mapping[str, str] | None = None,
    ) -> tuple[bytes, Mapping[str, str]]:
        """:meth:`request` with the response's headers (e.g. the server's ``Date``)."""
        api = self._api
        headers: dict[str, str] = dict(api.default_headers)
        headers["Accept"] = JSON
        data: bytes | None = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        api.update_params_for_auth(headers, [], _AUTH_SETTINGS)
        if query:
            path += "?" + urlencode(query)
        pool = self._connection_pool()
        if pool is None:
            response = api.rest_client.pool_manager.urlopen(
                method, self._host + path, body=data, headers=headers, preload_content=False, redirect=False
            )
        else:
            response = pool.urlopen(
                method,
                self._prefix + path,
                body=data,
                headers=headers,
                preload_content=False,
                redirect=False,
                assert_same_host=False,
            )
        try:
            payload: bytes = response.read()
        finally:
            # Read to the end: the connection goes back to the pool for the next call.
            response.release_conn()
        if not 200 <= response.status < 300:
            error = ApiException(status=response.status, reason=response.reason)
            error.body = payload
            error.headers = response.headers
            raise error
        return payload, response.headers

    def json(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        query: Mapping[str, str] | None = None,
    ) -> Any:
        """:meth:`request`, its answer parsed."""
        return json.loads(self.request(method, path, body, content_type=content_type, query=query))
