"""kube/rawapi.py against a scripted HTTP/1.1 server on the loopback: what goes on the wire, both
body framings, errors, and a kept-alive connection the server drops before answering."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from urllib3.exceptions import ProtocolError

from metering_operator.kube.rawapi import RawApi


def rawjson(raw: RawApi, method: str, path: str, body: Any = None, **kw: Any) -> Any:
    return json.loads(raw.exchange(method, path, body, **kw)[0])


@dataclass
class Seen:
    connection: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    #: The request (head and body) arrived in the first recv of this request.
    one_read: bool


@dataclass
class Server:
    """Answers each request with the next scripted reply: bytes, or None to close unanswered."""

    replies: list[bytes | None] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn, self.connections), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        with conn:
            while True:
                first = conn.recv(65536)
                if not first:
                    return
                buf += first
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ")
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
                length = int(headers.get("content-length", "0"))
                one_read = len(first) >= len(head) + 4 + length
                while len(buf) < length:
                    buf += conn.recv(65536)
                body, buf = buf[:length], buf[length:]
                self.seen.append(Seen(number, method, target, headers, body, one_read))
                reply = self.replies.pop(0)
                if reply is None:
                    return
                conn.sendall(reply)


def reply(status: str, body: bytes, *, chunked: bool = False, extra: str = "") -> bytes:
    if chunked:
        parts = [body[:7], body[7:]]
        framed = (
            b"".join(b"%x;ext=1\r\n%b\r\n" % (len(p), p) for p in parts if p) + b"0\r\nX-Trailer: t\r\n\r\n"
        )
        return f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n{extra}\r\n".encode() + framed
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.sock.close()


@pytest.fixture
def raw(server: Server) -> Iterator[RawApi]:
    configuration = client.Configuration(host=f"http://127.0.0.1:{server.port}/prefix")
    api = client.ApiClient(configuration)
    yield RawApi(api)
    api.close()


def test_json_on_one_connection_both_framings_head_and_body_in_one_write(server: Server, raw: RawApi) -> None:
    server.replies += [
        reply("201 Created", b'{"n":1}'),
        reply("200 OK", b'{"status":{"token":"abc.def.ghi"}}', chunked=True, extra="Date: Tue\r\n"),
        reply("200 OK", b'{"n":3}'),
    ]
    assert rawjson(raw, "POST", "/api/v1/namespaces/a/events", {"k": "v"}) == {"n": 1}
    payload, headers = raw.exchange(
        "PATCH", "/api/v1/x", [{"op": "add"}], content_type="application/json-patch+json"
    )
    assert json.loads(payload) == {"status": {"token": "abc.def.ghi"}}
    assert headers.get("date") == "Tue"
    assert headers.get("Date") == "Tue"
    assert rawjson(raw, "GET", "/api/v1/y", query={"a": "b c"}) == {"n": 3}
    assert server.connections == 1
    first, second, third = server.seen
    assert (second.method, second.target) == ("PATCH", "/prefix/api/v1/x")
    assert second.headers["host"] == f"127.0.0.1:{server.port}"
    assert second.headers["content-type"] == "application/json-patch+json"
    assert second.headers["accept"] == "application/json"
    assert second.headers["user-agent"] == first.headers["user-agent"]
    assert second.body == b'[{"op":"add"}]'
    assert second.one_read
    assert (third.target, third.body, "content-length" in third.headers) == (
        "/prefix/api/v1/y?a=b+c",
        b"",
        False,
    )


def test_error_status_raises_the_clients_api_exception(server: Server, raw: RawApi) -> None:
    server.replies += [reply("200 OK", b"{}"), reply("409 Conflict", b'{"code":409}', chunked=True)]
    rawjson(raw, "GET", "/api/v1/a")
    with pytest.raises(ApiException) as caught:
        rawjson(raw, "PATCH", "/api/v1/a", [])
    assert caught.value.status == 409
    assert caught.value.reason == "Conflict"
    assert json.loads(caught.value.body) == {"code": 409}
    assert caught.value.headers.get("transfer-encoding") == "chunked"


def test_dropped_connection_repeats_a_get_but_never_a_post(server: Server, raw: RawApi) -> None:
    server.replies += [reply("200 OK", b"{}"), None, reply("200 OK", b'{"again":true}')]
    rawjson(raw, "GET", "/api/v1/a")
    # The server reads the GET and closes without answering: repeated on a new connection.
    assert rawjson(raw, "GET", "/api/v1/b") == {"again": True}
    assert [(s.connection, s.target) for s in server.seen[1:]] == [
        (1, "/prefix/api/v1/b"),
        (2, "/prefix/api/v1/b"),
    ]
    server.replies += [None]
    with pytest.raises(ProtocolError):
        rawjson(raw, "POST", "/api/v1/events", {"once": 1})
    assert [s.method for s in server.seen].count("POST") == 1


def test_connection_close_answer_is_not_reused(server: Server, raw: RawApi) -> None:
    server.replies += [
        reply("200 OK", b"{}"),
        reply("200 OK", b"{}", extra="Connection: close\r\n"),
        reply("200 OK", b"{}"),
    ]
    for _ in range(3):
        rawjson(raw, "GET", "/api/v1/a")
    assert [s.connection for s in server.seen] == [1, 1, 2]


def test_unsafe_target_is_refused(server: Server, raw: RawApi) -> None:
    server.replies += [reply("200 OK", b"{}")]
    rawjson(raw, "GET", "/api/v1/a")
    with pytest.raises(ValueError, match="unsafe"):
        rawjson(raw, "GET", "/api/v1/a b\r\nX: y")


def test_a_malformed_answer_is_a_protocol_error_and_its_connection_is_not_reused(
    server: Server, raw: RawApi
) -> None:
    server.replies += [
        reply("200 OK", b"{}"),
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n{}",
        reply("200 OK", b'{"fresh":1}'),
    ]
    rawjson(raw, "GET", "/api/v1/a")
    with pytest.raises(ProtocolError):
        rawjson(raw, "POST", "/api/v1/events", {"k": "v"})
    assert rawjson(raw, "GET", "/api/v1/b") == {"fresh": 1}
    assert [s.connection for s in server.seen] == [1, 1, 2]
