"""A tiny HTTPS/JSON client for bootstrapping the local cluster, and a polling helper.

The harness needs a handful of calls (readiness, one binding, the fake nodes) before any
kubeconfig-based client is useful; the standard library does them without importing the
Kubernetes client, which keeps `python -m devtools.cluster up` quick on a warm machine.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ClusterStartError(RuntimeError):
    """A control-plane component did not come up; the message names it and shows its log."""


@dataclass(frozen=True)
class Response:
    status: int
    body: Any


class KubeHttp:
    """JSON requests against one API server with a client certificate (or anonymously)."""

    def __init__(
        self,
        server: str,
        ca_file: Path,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=str(ca_file))
        if cert_file is not None and key_file is not None:
            self._ctx.load_cert_chain(str(cert_file), str(key_file))

    def request(self, method: str, path: str, body: Any = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._ctx, timeout=self.timeout) as resp:
                return Response(resp.status, _decode(resp.read()))
        except urllib.error.HTTPError as err:
            return Response(err.code, _decode(err.read()))

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def create(self, path: str, body: Any) -> Response:
        """POST, treating "already exists" as success so bootstrap steps are idempotent."""
        resp = self.request("POST", path, body)
        if resp.status not in (200, 201, 202, 409):
            raise ClusterStartError(f"POST {path} failed with {resp.status}: {resp.body}")
        return resp


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def reachable(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 2.0) -> bool:
    """True if GET url answers 200 (any connection or HTTP error counts as not yet)."""
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 0.25,
    on_timeout: Callable[[], str] = lambda: "",
    still_running: Callable[[], bool] = lambda: True,
) -> T:
    """Poll ``probe`` until it returns something truthy; raise a named error on timeout.

    ``still_running`` lets a crashed process fail the wait at once instead of after the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = probe()
        except (OSError, urllib.error.URLError, ssl.SSLError):
            result = None
        if result:
            return result
        if not still_running():
            raise ClusterStartError(f"{what}: the process exited\n{on_timeout()}")
        if time.monotonic() > deadline:
            raise ClusterStartError(f"timed out after {timeout:.0f}s waiting for {what}\n{on_timeout()}")
        time.sleep(interval)
