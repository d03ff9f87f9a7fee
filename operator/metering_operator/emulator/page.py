"""A read-only HTML page at ``/_emulator/``: what AWS would bill, the calls it saw, the faults set.

For a person watching a demo or a test run in a browser; scripts use the JSON admin API. The page
is rendered on the server from the same data as ``/_emulator/billing``, ``/events`` and
``/faults``, with every value HTML-escaped (callers choose product codes, user agents and error
messages), no script and no form: a Content-Security-Policy allows nothing but its inline style.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from aiohttp import web

from metering_operator.emulator.admin import PREFIX, billing_report
from metering_operator.emulator.context import EmulatorContext

#: How many of the newest calls the page lists (the JSON API pages through all of them).
RECENT_CALLS = 50
STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.error { color: #a00; } .muted { color: #777; }
"""
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=num' if i in numeric else ''}>{cell}</td>" for i, cell in enumerate(row))
        + "</tr>"
        for row in rows
    )
    if not body:
        return f'<p id="{table_id}" class="muted">none</p>'
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _bill(report: dict[str, Any]) -> str:
    pods = _table(
        ["product", "namespace", "pod", "account", "registered", "ended", "billed s", "$/hour", "amount"],
        (
            [
                _e(p["productCode"]),
                _e(p["namespace"]),
                _e(p["podName"] or p["callerKey"]),
                _e(p["account"]),
                _e(p["registeredAt"]),
                _e(p["endedAt"] or "running"),
                _e(p["billedSeconds"]),
                _e(p["hourlyPrice"]),
                _e(f"{p['amount']:.6f}"),
            ]
            for p in report["pods"]
        ),
        {6, 7, 8},
        "pods",
    )
    dimensions = _table(
        ["product", "dimension", "hour", "source", "records", "quantity", "unit price", "amount"],
        (
            [
                _e(d["productCode"]),
                _e(d["dimension"]),
                _e(d["hour"]),
                _e(d["source"]),
                _e(d["records"]),
                _e(d["quantity"]),
                _e(d["unitPrice"]),
                _e(f"{d['amount']:.6f}"),
            ]
            for d in report["dimensions"]
        ),
        {4, 5, 6, 7},
        "dimensions",
    )
    return (
        f'<h2>What AWS would bill</h2><p>Total <strong id="total">${report["totalAmount"]:.6f}</strong>'
        f" at {_e(report['now'])} (emulator clock).</p>"
        f"<h3>Pods (hourly pricing, per second, one-minute minimum)</h3>{pods}"
        f"<h3>Custom dimensions (MeterUsage, BatchMeterUsage)</h3>{dimensions}"
    )


def _caller(event: dict[str, Any]) -> str:
    identity = event.get("userIdentity") or {}
    return str(identity.get("arn") or identity.get("type") or "unauthenticated")


def _calls(events: list[dict[str, Any]]) -> str:
    rows = []
    for event in events:
        code = event.get("errorCode")
        result = (
            f'<span class="error">{_e(code)}</span>' + (" (injected)" if event.get("injected") else "")
            if code
            else "OK"
        )
        params = event.get("requestParameters")
        product = params.get("ProductCode") if isinstance(params, dict) else None
        rows.append(
            [
                _e(event["seq"]),
                _e(event.get("eventTime")),
                _e(event.get("eventName")),
                _e(_caller(event)),
                _e(product),
                result,
                _e(event.get("durationMs")),
            ]
        )
    table = _table(["#", "time", "operation", "caller", "product", "result", "ms"], rows, {0, 6}, "calls")
    return f"<h2>Calls (newest first, last {RECENT_CALLS})</h2>{table}"


def _faults(faults: dict[str, dict[str, Any]]) -> str:
    rows = []
    for operation, fault in sorted(faults.items()):
        active = {k: v for k, v in fault.items() if v}  # unset: None, 0, False, []
        rows.append([_e(operation), _e(", ".join(f"{k}={v}" for k, v in active.items()) or "none")])
    return f"<h2>Faults</h2>{_table(['operation', 'injected'], rows, set(), 'faults')}"


def render(ctx: EmulatorContext) -> str:
    report = billing_report(ctx)
    region = ctx.config.region or "any Region"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        "<title>AWS Marketplace Metering emulator</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>AWS Marketplace Metering emulator</h1>"
        f'<p>Clock <span id="clock">{_e(ctx.clock.now().isoformat())}</span>, {_e(region)}. '
        f"Read-only; the JSON admin API is under <code>{PREFIX}/</code> (docs/emulator.md).</p>"
        + _bill(report)
        + _calls(ctx.state.recent_events(RECENT_CALLS))
        + _faults(ctx.faults.effective())
        + "</body></html>"
    )


def add_routes(app: web.Application, ctx: EmulatorContext) -> None:
    async def page(_: web.Request) -> web.Response:
        return web.Response(text=render(ctx), content_type="text/html", headers=HEADERS)

    app.router.add_get(f"{PREFIX}/", page)
