"""What one request may cost the emulator: read time, body size and what the event log keeps of it.

The emulator is a test double that people run in small containers (the chart's in-cluster
emulator has a 256Mi memory limit) and sometimes expose to a whole test cluster, so no caller,
authenticated or not, may hold a connection open indefinitely, send an unbounded body, or grow its
SQLite event log without limit. The retention of the log itself is in ``state.State.add_event``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

#: AWS caps BatchMeterUsage at 1 MB; leave room for the JSON framing around the records.
MAX_JSON_BODY = 1024 * 1024 + 64 * 1024
#: STS query requests are small: a web identity token is at most 20,000 characters (AWS model).
MAX_QUERY_BODY = 64 * 1024
#: Per value kept from a request nobody authenticated (a request that failed before STS or SigV4
#: accepted it): enough to see what was sent, too little to fill the disk.
MAX_UNAUTHENTICATED_VALUE = 256
MAX_UNAUTHENTICATED_KEYS = 32
#: requestParameters larger than this (serialized) are logged as a summary.
MAX_LOGGED_PARAMETERS = 32 * 1024


class BodyTimeout(Exception):
    """The request's body did not arrive within the read timeout."""


async def read_body(request: web.Request, seconds: float) -> bytes:
    """The whole request body, or BodyTimeout after ``seconds`` of waiting for it."""
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout from None


def request_timeout_response(timeout: float) -> web.Response:
    """HTTP 408, and the connection closed after it (the rest of the body is never read)."""
    response = web.json_response(
        {"error": f"the request body did not arrive within {timeout:g} seconds"}, status=408
    )
    response.force_close()
    return response


def unauthenticated(params: dict[str, Any]) -> dict[str, Any]:
    """A request nobody authenticated, as the log keeps it: few keys, each value cut short."""
    kept: dict[str, Any] = {}
    for key, value in list(params.items())[:MAX_UNAUTHENTICATED_KEYS]:
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        cut = text[:MAX_UNAUTHENTICATED_VALUE]
        kept[str(key)[:MAX_UNAUTHENTICATED_VALUE]] = cut + "..." if len(text) > len(cut) else cut
    if len(params) > MAX_UNAUTHENTICATED_KEYS:
        kept["_omittedKeys"] = len(params) - MAX_UNAUTHENTICATED_KEYS
    return kept


def logged_parameters(params: Any) -> Any:
    """requestParameters as stored: the parameters, or a summary when they are very large."""
    if not isinstance(params, (dict, list)):
        return None
    size = len(json.dumps(params, default=str))
    if size <= MAX_LOGGED_PARAMETERS:
        return params
    summary: dict[str, Any] = {"_truncated": True, "_bytes": size}
    if isinstance(params, dict):
        summary["_keys"] = [str(k)[:100] for k in list(params)[:MAX_UNAUTHENTICATED_KEYS]]
        records = params.get("UsageRecords")
        if isinstance(records, list):
            summary["_usageRecords"] = len(records)
        if isinstance(params.get("ProductCode"), str):
            summary["ProductCode"] = params["ProductCode"][:255]
    return summary
