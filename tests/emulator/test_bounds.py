"""The emulator bounded, through raw HTTP against a real emulator process (no boto3 on the wire).

What one caller may cost the emulator: a half-sent request is closed after the read timeout,
bodies are capped per protocol, requests nobody authenticated are logged as a short trace, the
event log keeps a bounded number of calls for a bounded time, and the event listing is paged.
Also: an empty ``CustomerIdentifier`` (what SDKs that fill in the model's defaults send) counts
as absent in BatchMeterUsage.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.emulator.conftest import BUYER, CUSTOM, REGION, STATIC_KEY, STATIC_SECRET, clock_fixed_at
from tests.emulator.harness import EmulatorProcess, start_emulator

READ_TIMEOUT = 1.0
# The read timeout plus aiohttp's lingering close (2 s) and a busy 2-core machine's slack.
CLOSED_WITHIN = READ_TIMEOUT + 2.0 + 5.0
NOW = dt.datetime(2031, 5, 20, 12, 30, tzinfo=dt.UTC)


@pytest.fixture
def bounded(tmp_path: Path) -> Iterator[EmulatorProcess]:
    """An emulator with a short read timeout and a small event log."""
    config = {
        "region": REGION,
        "limits": {"requestTimeoutSeconds": READ_TIMEOUT, "maxEvents": 5},
        "products": [
            {
                "productCode": CUSTOM,
                "dimensions": ["replicas"],
                "entitledAccounts": [BUYER],
                "customers": [{"awsAccountId": BUYER, "customerIdentifier": "cust-buyer"}],
            }
        ],
        "staticCredentials": [
            {
                "accessKeyId": STATIC_KEY,
                "secretAccessKey": STATIC_SECRET,
                "arn": f"arn:aws:iam::{BUYER}:user/s",
            }
        ],
    }
    emu = start_emulator(config, tmp_path / "state")
    try:
        yield emu
    finally:
        emu.stop()
        assert "Traceback" not in emu.log(), emu.log()


def _address(emu: EmulatorProcess) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(emu.url)
    assert parsed.hostname
    assert parsed.port
    return parsed.hostname, parsed.port


def _closed_after(sock: socket.socket) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before closing."""
    started = time.monotonic()
    sock.settimeout(CLOSED_WITHIN + 5)
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return time.monotonic() - started, received
        received += chunk


def _signed_json(emu: EmulatorProcess, operation: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """One JSON 1.1 Metering call, signed with SigV4 like any SDK signs it, sent with http.client."""
    data = json.dumps(body).encode()
    request = AWSRequest(
        method="POST",
        url=emu.url + "/",
        data=data,
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"AWSMPMeteringService.{operation}",
        },
    )
    SigV4Auth(Credentials(STATIC_KEY, STATIC_SECRET), "aws-marketplace", REGION).add_auth(request)
    host, port = _address(emu)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request("POST", "/", body=data, headers=dict(request.headers.items()))
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def _raw(
    emu: EmulatorProcess, method: str, path: str, body: bytes = b"", **headers: str
) -> tuple[int, bytes]:
    host, port = _address(emu)
    conn = http.client.HTTPConnection(host, port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _batch(**customer: str) -> dict[str, Any]:
    return {
        "ProductCode": CUSTOM,
        "UsageRecords": [
            {"Timestamp": (NOW - dt.timedelta(hours=1)).timestamp(), "Dimension": "replicas", "Quantity": 3}
            | customer
        ],
    }


def test_empty_customer_identifier_counts_as_absent(bounded: EmulatorProcess) -> None:
    with clock_fixed_at(bounded, NOW):
        # What an SDK that fills in the model's default ("") sends beside the account id.
        status, answer = _signed_json(
            bounded, "BatchMeterUsage", _batch(CustomerIdentifier="", CustomerAWSAccountId=BUYER)
        )
        assert status == 200, answer
        assert [r["Status"] for r in answer["Results"]] == ["Success"], answer
        # "" alone is no customer at all: exactly one of the two is still required.
        status, answer = _signed_json(bounded, "BatchMeterUsage", _batch(CustomerIdentifier=""))
        assert status == 400, answer
        assert answer["__type"].endswith("ValidationException"), answer
        assert "exactly one of CustomerIdentifier or CustomerAWSAccountId" in answer["message"]
        # A real identifier still resolves the customer.
        status, answer = _signed_json(bounded, "BatchMeterUsage", _batch(CustomerIdentifier="cust-buyer"))
        assert status == 200, answer


def test_half_sent_request_headers_are_closed_after_the_read_timeout(bounded: EmulatorProcess) -> None:
    with socket.create_connection(_address(bounded)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: emulator\r\nContent-Type: text/plain\r\n")  # never ends
        elapsed, _ = _closed_after(sock)
    assert READ_TIMEOUT * 0.9 <= elapsed < CLOSED_WITHIN, elapsed
    assert bounded.admin.health()["ok"] is True


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/", b"X-Amz-Target: AWSMPMeteringService.MeterUsage\r\n"),
        ("/", b"Content-Type: application/x-www-form-urlencoded\r\n"),
        ("/_emulator/clock", b"Content-Type: application/json\r\n"),
    ],
    ids=["metering", "sts", "admin"],
)
def test_half_sent_body_is_answered_408_and_closed(
    bounded: EmulatorProcess, path: str, headers: bytes
) -> None:
    with socket.create_connection(_address(bounded)) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: emulator\r\nContent-Length: 1000\r\n".encode()
            + headers
            + b"\r\n"
            + b"{" * 10
        )
        elapsed, received = _closed_after(sock)
    assert received.startswith(b"HTTP/1.1 408"), received[:200]
    assert READ_TIMEOUT * 0.9 <= elapsed < CLOSED_WITHIN, elapsed


def test_request_bodies_are_capped_per_protocol(bounded: EmulatorProcess) -> None:
    # STS forms are small (a web identity token is at most 20,000 characters).
    form = urllib.parse.urlencode({"Action": "AssumeRoleWithWebIdentity", "RoleArn": "r" * 70_000})
    status, body = _raw(
        bounded, "POST", "/", form.encode(), **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 413, body
    assert b"larger than 64 KB" in body
    # JSON 1.1 allows BatchMeterUsage's 1 MB, and no more.
    status, body = _raw(
        bounded,
        "POST",
        "/",
        b"{" + b" " * (1200 * 1024) + b"}",
        **{"X-Amz-Target": "AWSMPMeteringService.BatchMeterUsage"},
    )
    assert status == 413, body
    assert b"larger than 1 MB" in body


def test_unauthenticated_requests_are_logged_as_a_short_trace(bounded: EmulatorProcess) -> None:
    form = urllib.parse.urlencode(
        {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": "arn:aws:iam::111122223333:role/" + "x" * 60_000,
            "RoleSessionName": "s",
            "WebIdentityToken": "not-a-jwt",
        }
    )
    status, _ = _raw(
        bounded, "POST", "/", form.encode(), **{"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 400
    [event] = bounded.admin.events(operation="AssumeRoleWithWebIdentity")[-1:]
    assert event["errorCode"], event
    params = event["requestParameters"]
    assert params["RoleArn"].startswith("arn:aws:iam::111122223333:role/xxx")
    assert len(params["RoleArn"]) <= 260, len(params["RoleArn"])
    assert len(json.dumps(event)) < 4096
    # On disk too: the stored row is small.
    with sqlite3.connect(bounded.state_dir / "emulator.sqlite3") as db:
        (size,) = db.execute("SELECT MAX(LENGTH(data)) FROM events").fetchone()
    assert size < 4096, size


def test_event_log_keeps_the_newest_max_events(bounded: EmulatorProcess) -> None:
    for _ in range(12):
        _raw(
            bounded,
            "POST",
            "/",
            b"Action=NoSuchAction",
            **{"Content-Type": "application/x-www-form-urlencoded"},
        )
    events = bounded.admin.events()
    assert len(events) == 5, [e["seq"] for e in events]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    assert seqs[-1] - seqs[0] == 4  # the newest five, none skipped


def test_event_log_drops_events_older_than_the_retention_age(tmp_path: Path) -> None:
    # A retention age far below one HTTP round trip: each call finds every earlier one too old.
    emu = start_emulator({"limits": {"maxEventAgeSeconds": 0.000001}}, tmp_path / "state")
    try:
        for _ in range(3):
            _raw(
                emu,
                "POST",
                "/",
                b"Action=NoSuchAction",
                **{"Content-Type": "application/x-www-form-urlencoded"},
            )
        events = emu.admin.events()
        assert len(events) == 1, events
        assert events[0]["seq"] == 3
    finally:
        emu.stop()


def test_event_listing_is_paged(tmp_path: Path) -> None:
    emu = start_emulator(None, tmp_path / "state")
    try:
        for _ in range(130):
            _raw(
                emu,
                "POST",
                "/",
                b"Action=NoSuchAction",
                **{"Content-Type": "application/x-www-form-urlencoded"},
            )
        status, body = _raw(emu, "GET", "/_emulator/events")
        assert status == 200
        page = json.loads(body)
        assert len(page["events"]) == 100, "the default page size"
        assert page["more"] is True
        assert page["nextSince"] == page["events"][-1]["seq"]
        status, body = _raw(emu, "GET", f"/_emulator/events?since={page['nextSince']}")
        rest = json.loads(body)
        assert len(rest["events"]) == 30
        assert rest["more"] is False
        status, body = _raw(emu, "GET", "/_emulator/events?limit=1001")
        assert status == 400
        assert b"limit must be from 1 to 1000" in body
        # The admin client reads every page.
        assert len(emu.admin.events()) == 130
    finally:
        emu.stop()
