"""The emulator's read-only HTML page (``/_emulator/``), loaded in headless Chromium.

Real calls go to a real emulator process (boto3 over HTTP); Debian's Chromium then loads the page
(`--headless --dump-dom`: the DOM after parsing) and the test reads its tables: what AWS would
bill (a registered pod, a metered dimension, the total), the calls newest first with their
errors, and the faults set. A product code chosen by a caller is shown as text, never as markup.
"""

from __future__ import annotations

import datetime as dt
import http.client
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.emulator.conftest import CUSTOM, HOURLY, clock_fixed_at, metering
from tests.emulator.harness import EmulatorProcess

NOW = dt.datetime(2031, 7, 1, 9, 30, tzinfo=dt.UTC)
PROBE = '<img src=x onerror="alert(1)">'


class Tables(HTMLParser):
    """Every <table id=...> as rows of cell texts, and every element id's text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self.tags: list[str] = []
        self._table: str | None = None
        self._cell: list[str] | None = None
        self._ids: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        element_id = dict(attrs).get("id")
        if tag == "table" and element_id:
            self._table = element_id
            self.tables[element_id] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []
        if element_id:
            self._ids.append((tag, element_id))
            self.texts[element_id] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None
        if self._ids and self._ids[-1][0] == tag:
            self._ids.pop()

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, element_id in self._ids:
            self.texts[element_id] += data


def chromium_dom(url: str, profile: Path) -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")
    done = subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",  # as root in CI; the page is our own
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def billed(emulator: EmulatorProcess, pod_creds: Callable[..., dict[str, str]]) -> Iterator[dict[str, Any]]:
    """One registered pod, one metered hour, one refused call, a hostile product code, a fault."""
    with clock_fixed_at(emulator, NOW):
        creds = pod_creds()
        client = metering(emulator, creds)
        client.register_usage(ProductCode=HOURLY, PublicKeyVersion=1, Nonce="nonce-1")
        record = client.meter_usage(
            ProductCode=CUSTOM,
            Timestamp=NOW - dt.timedelta(hours=1),
            UsageDimension="replicas",
            UsageQuantity=7,
        )
        with pytest.raises(ClientError):
            client.register_usage(ProductCode="no-such-product", PublicKeyVersion=1)
        with pytest.raises(ClientError):
            client.meter_usage(ProductCode=PROBE, Timestamp=NOW, UsageDimension="replicas", UsageQuantity=1)
        emulator.admin.set_fault("MeterUsage", throttle_rate=0.5)
        yield {"record": record["MeteringRecordId"], "billing": emulator.admin.billing()}


def test_page_shows_the_bill_the_calls_and_the_faults(
    emulator: EmulatorProcess, billed: dict[str, Any], tmp_path: Path
) -> None:
    dom = chromium_dom(emulator.url + "/_emulator/", tmp_path / "chromium")
    page = Tables()
    page.feed(dom)

    billing = billed["billing"]
    assert page.texts["total"] == f"${billing['totalAmount']:.6f}"
    assert billing["totalAmount"] > 0
    # The pod: registered at the fixed clock, billed the one-minute minimum.
    header, *pods = page.tables["pods"]
    assert header[:3] == ["product", "namespace", "pod"]
    [pod] = [row for row in pods if row[0] == HOURLY]
    assert pod[header.index("billed s")] == "60.0"
    assert pod[header.index("amount")] == f"{billing['pods'][0]['amount']:.6f}"
    # The metered hour: 7 replicas at 0.1.
    header, *dimensions = page.tables["dimensions"]
    [row] = [r for r in dimensions if r[0] == CUSTOM]
    assert row[header.index("dimension")] == "replicas"
    assert row[header.index("quantity")] == "7"
    assert row[header.index("amount")] == "0.700000"

    # The calls, newest first: the hostile code shown as text, the refused product, then the successes.
    header, *calls = page.tables["calls"]
    operations = [c[header.index("operation")] for c in calls]
    results = [c[header.index("result")] for c in calls]
    products = [c[header.index("product")] for c in calls]
    assert products[0] == PROBE
    assert operations[:4] == ["MeterUsage", "RegisterUsage", "MeterUsage", "RegisterUsage"]
    assert results[1] == "InvalidProductCodeException"
    assert results[2:4] == ["OK", "OK"]
    assert "AssumeRoleWithWebIdentity" in operations
    assert "img" not in page.tags, "a caller's product code became markup"
    assert "script" not in page.tags
    assert "form" not in page.tags

    # The fault set through the admin API.
    header, *faults = page.tables["faults"]
    assert ["MeterUsage", "throttleRate=0.5"] in faults


def test_page_is_read_only(emulator: EmulatorProcess) -> None:
    parsed = urllib.parse.urlsplit(emulator.url)
    assert parsed.hostname
    assert parsed.port
    for method in ("POST", "GET"):
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
        try:
            conn.request(method, "/_emulator/", body=b"x=1" if method == "POST" else None)
            response = conn.getresponse()
            response.read()
        finally:
            conn.close()
        if method == "POST":
            assert response.status in (404, 405)
        else:
            assert response.status == 200
            policy = response.getheader("Content-Security-Policy")
            assert policy == "default-src 'none'; style-src 'unsafe-inline'"
