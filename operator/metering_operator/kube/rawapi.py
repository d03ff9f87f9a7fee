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
keep their ``exc.status`` handling. On a connection the pool already holds, the request is written
and its answer parsed by ``httptools`` (:func:`_send`, below), not through urllib3's ``urlopen``: that halved
the call's CPU again (about 0.23 instead of 0.5 ms; bench/results/calls.md).

Blocking, like the sync client: call it from worker threads, never on kopf's event loop.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping
from http.client import RemoteDisconnected
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httptools
import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3 import HTTPHeaderDict
from urllib3.exceptions import ProtocolError

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
        url = urlsplit(self._host)
        #: The path the server's URL may carry before ``/api`` (an API proxy's prefix).
        self._prefix = url.path
        # http.client's Host header: the port only when it is not the scheme's default.
        default_port = 443 if url.scheme == "https" else 80
        host = url.hostname or ""
        host = f"[{host}]" if ":" in host else host
        self._host_header = host if url.port in (None, default_port) else f"{host}:{url.port}"
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

    def exchange(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = JSON,
        query: Mapping[str, str] | None = None,
    ) -> tuple[bytes, Mapping[str, str]]:
        """The response body of ``method path`` (``path`` starts with ``/api`` or ``/apis``) and its
        headers (e.g. the server's ``Date``); :class:`ApiException` with the status, reason,
        headers and body when the status is not 2xx."""
        payload, headers = self._call(method, path, body, content_type, query)
        return payload, _header_dict(headers)

    def _call(
        self, method: str, path: str, body: Any, content_type: str, query: Mapping[str, str] | None
    ) -> tuple[bytes, Mapping[str, str]]:
        api = self._api
        headers: dict[str, str] = dict(api.default_headers)
        headers["Accept"] = JSON
        data: bytes | None = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body, separators=(",", ":")).encode()
        # Per call: the client's refresh hook may rotate the token (in-cluster token file).
        api.update_params_for_auth(headers, [], _AUTH_SETTINGS)
        if query:
            path += "?" + urlencode(query)
        pool = self._connection_pool()
        answer = (
            None
            if pool is None
            else _send(pool, method, self._prefix + path, self._host_header, headers, data)
        )
        if answer is None:
            answer = self._urlopen(pool, method, path, headers, data)
        status, reason, response_headers, payload = answer
        if not 200 <= status < 300:
            error = ApiException(status=status, reason=reason)
            error.body = payload
            error.headers = _header_dict(response_headers)
            raise error
        return payload, response_headers

    def _urlopen(
        self,
        pool: urllib3.HTTPConnectionPool | None,
        method: str,
        path: str,
        headers: dict[str, str],
        data: bytes | None,
    ) -> tuple[int, str, Mapping[str, str], bytes]:
        """The request through urllib3's own ``urlopen`` (its retries, proxies): behind a proxy,
        and when :func:`_send` gives a request back (a new connection, or a reused one the server
        had closed, for a method safe to repeat)."""
        if pool is None:
            response = self._api.rest_client.pool_manager.urlopen(
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
        return response.status, response.reason or "", response.headers, payload


# -- the request on a pooled connection -----------------------------------------------------------
#
# urllib3's ``urlopen`` and http.client cost most of a raw call's CPU: per call a Timeout clone, a
# Retry object, header-key sets, ``putrequest``/``putheader`` validation, the head and the body as
# two TLS records (two encryptions, two syscalls), and the response's headers parsed by the
# ``email`` package. The gate makes three of these calls per pod, so the request is written here,
# on a connection of the same urllib3 pool (its TLS context, client certificate, timeouts and
# connection count), head and body in one ``sendall``, and the answer is parsed by ``httptools``
# (llhttp, the parser Node.js and uvicorn use): its framing (Content-Length, chunked), keep-alive
# and errors are llhttp's, not ours.

#: Methods repeated on a fresh connection when a reused one turns out closed before any answer
#: (the server dropped it while idle), as urllib3's default ``Retry`` repeats them.
_REPEATABLE = frozenset({"GET", "PUT", "DELETE", "OPTIONS"})
#: Refuse request targets and header values that would break the request's framing.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")
_UNSAFE_VALUE = re.compile(r"[\r\n\x00]")
_RECV = 1 << 16


class _Answer:
    """The parser's callbacks: the response as llhttp reads it."""

    __slots__ = ("body", "complete", "headers", "keep_alive", "parser", "reason")

    def __init__(self) -> None:
        self.reason = ""
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        # Only known here: once the message is complete, llhttp has reset its flags.
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


def _send(
    pool: urllib3.HTTPConnectionPool,
    method: str,
    target: str,
    host: str,
    headers: Mapping[str, str],
    data: bytes | None,
) -> tuple[int, str, Mapping[str, str], bytes] | None:
    """One request on a pooled connection; None to have urllib3 send it instead (see above)."""
    if method == "HEAD":
        return None  # a HEAD answer's Content-Length announces no body: urllib3 knows, llhttp not
    if _UNSAFE.search(target):
        raise ValueError(f"unsafe characters in request target {target!r}")
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    for name, value in headers.items():
        if _UNSAFE_VALUE.search(value) or _UNSAFE.search(name):
            raise ValueError(f"unsafe characters in header {name!r}")
        lines.append(f"{name}: {value}")
    if data is not None:
        lines.append(f"Content-Length: {len(data)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    message = head + data if data is not None else head

    # urllib3's own pool API (the same calls its urlopen makes): a connection with its TLS
    # session and timeouts, given back after the answer.
    conn: Any = pool._get_conn()
    if conn.sock is None:
        # A new connection: urllib3 connects it (and retries a failed connect) in urlopen.
        pool._put_conn(conn)
        return None
    received = False
    answer = _Answer()
    try:
        conn.sock.sendall(message)
        while not answer.complete:
            chunk = conn.sock.recv(_RECV)
            if not chunk:
                raise RemoteDisconnected("the API server closed the connection without a whole answer")
            received = True
            answer.parser.feed_data(chunk)
        status = answer.parser.get_status_code()
        if status < 200:
            raise ProtocolError(f"unexpected interim response {status}")
    except (OSError, ProtocolError, ValueError, httptools.HttpParserError) as exc:
        conn.close()
        pool._put_conn(conn)
        if not received and method in _REPEATABLE and isinstance(exc, OSError):
            return None
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError("Connection aborted.", exc) from exc
    if not answer.keep_alive:
        conn.close()
    pool._put_conn(conn)
    return status, answer.reason, answer.headers, bytes(answer.body)


def _header_dict(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Case-insensitive headers, as urllib3 gives them (the raw path keeps a plain dict)."""
    return headers if isinstance(headers, HTTPHeaderDict) else HTTPHeaderDict(headers)
