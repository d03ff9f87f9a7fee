"""The admin API under ``/_emulator/`` (JSON): what AWS saw and would bill, faults, clock, config.

Meant for tests, demos and sellers' CI on a local machine; it has no authentication, so bind
the emulator to loopback. Reference: docs/emulator.md.
"""

from __future__ import annotations

import json
import secrets
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from metering_operator.emulator import bounds, licensing
from metering_operator.emulator.config import OPERATIONS, ConfigError, Fault
from metering_operator.emulator.context import EmulatorContext
from metering_operator.emulator.state import EVENTS_PAGE_DEFAULT, EVENTS_PAGE_MAX, Checkout
from metering_operator.emulator.validation import strict_json

PREFIX = "/_emulator"
#: The read timeout of request bodies (the emulator's limits.requestTimeoutSeconds), set at start.
READ_TIMEOUT_KEY: web.AppKey[float] = web.AppKey("read_timeout", float)
MINUTE = 60.0
# A century: far beyond any test's needs, and keeps every computed time inside datetime's range.
MAX_SECONDS = 100 * 366 * 86400.0


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _iso_fields(rows: list[dict[str, Any]], *keys: str) -> list[dict[str, Any]]:
    """The rows with their epoch-second ``keys`` written as ISO 8601 UTC."""
    for row in rows:
        for key in keys:
            row[key] = _iso(row[key])
    return rows


async def _json_body(request: web.Request) -> dict[str, Any]:
    timeout = request.app[READ_TIMEOUT_KEY]
    try:
        raw = await bounds.read_body(request, timeout)
    except bounds.BodyTimeout:
        raise web.HTTPRequestTimeout(
            text=json.dumps({"error": f"the request body did not arrive within {timeout:g} seconds"}),
            content_type="application/json",
        ) from None
    try:
        data = strict_json(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}), content_type="application/json"
        )
    return data


def _number(value: Any, name: str, low: float, high: float) -> float:
    """``value`` as a float within [low, high], or HTTP 400 naming ``name`` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be a number from {low:g} to {high:g}"}),
            content_type="application/json",
        )
    return float(value)


def _pydantic_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


def _pod_bill(ctx: EmulatorContext, reg: dict[str, Any], now: float) -> dict[str, Any]:
    """Hourly pricing: a registered pod is billed per second until deregistered, 1 minute minimum."""
    product = ctx.config.product(reg["productCode"])
    price = product.hourly_price if product else 0.0
    end = reg["deregisteredAt"] if reg["deregisteredAt"] is not None else now
    seconds = max(0.0, end - reg["firstAt"])
    billed = max(MINUTE, seconds)
    identity = reg["identity"]
    return {
        "productCode": reg["productCode"],
        "callerKey": reg["callerKey"],
        "podUid": identity.get("podUid"),
        "podName": identity.get("podName"),
        "namespace": identity.get("namespace"),
        "account": identity.get("accountId"),
        "registeredAt": _iso(reg["firstAt"]),
        "endedAt": _iso(reg["deregisteredAt"]),
        "seconds": round(seconds, 3),
        "billedSeconds": round(billed, 3),
        "hourlyPrice": price,
        "amount": round(billed / 3600 * price, 6),
    }


def _dimension_bills(ctx: EmulatorContext, product_code: str | None) -> list[dict[str, Any]]:
    """Custom dimensions: the quantities of every (product, dimension, hour, source), priced."""
    grouped: dict[tuple[str, str, float, str], list[Decimal]] = defaultdict(list)
    for rec in ctx.state.meter_records(product_code):
        grouped[(rec.product_code, rec.dimension, rec.hour, "MeterUsage")].append(Decimal(rec.quantity))
    for row in ctx.state.batch_records(product_code):
        key = (row["productCode"], row["dimension"], row["hour"], f"BatchMeterUsage:{row['customer']}")
        grouped[key].append(Decimal(row["quantity"]))
    bills = []
    for (code, dimension, hour, source), quantities in sorted(grouped.items()):
        product = ctx.config.product(code)
        price = next((d.price for d in product.dimensions if d.name == dimension), 0.0) if product else 0.0
        total = sum(quantities, Decimal(0))
        bills.append(
            {
                "productCode": code,
                "dimension": dimension,
                "hour": _iso(hour),
                "source": source,
                "records": len(quantities),
                "quantity": str(total),
                "unitPrice": price,
                "amount": float(round(total * Decimal(str(price)), 6)),
            }
        )
    return bills


def _seat_usage(ctx: EmulatorContext, license_arn: str | None, now: float) -> list[dict[str, Any]]:
    """License Manager contracts: per license and entitlement, what active checkouts hold now.

    Contracts are prepaid, so seats carry no amount here; usage beyond maxCount (overage) is what a
    contract-with-consumption product bills through MeterUsage dimensions.
    """
    views = []
    for lic in ctx.config.licenses:
        if license_arn and lic.license_arn != license_arn:
            continue
        checkouts = ctx.state.checkouts(lic.license_arn, active_at=now)
        entitlements = []
        for entitlement in lic.entitlements:
            held = licensing.in_use(ctx, lic.license_arn, entitlement.name, now)
            holding = [c for c in checkouts if any(e["Name"] == entitlement.name for e in c.entitlements)]
            entry: dict[str, Any] = {
                "name": entitlement.name,
                "unit": entitlement.unit,
                "maxCount": entitlement.max_count,
                "overageAllowed": entitlement.overage,
                "inUse": str(held),
                "activeCheckouts": len(holding),
                "perpetualCheckouts": sum(1 for c in holding if c.checkout_type == "PERPETUAL"),
            }
            if entitlement.max_count is not None:
                entry["available"] = str(max(Decimal(0), Decimal(entitlement.max_count) - held))
                entry["overage"] = str(max(Decimal(0), held - Decimal(entitlement.max_count)))
            entitlements.append(entry)
        views.append(
            {
                "licenseArn": lic.license_arn,
                "productSKU": lic.product_sku,
                "buyerAccount": lic.buyer_account,
                "status": lic.status,
                "entitlements": entitlements,
            }
        )
    return views


def _checkout_view(checkout: Checkout, now: float) -> dict[str, Any]:
    return {
        "licenseConsumptionToken": checkout.token,
        "licenseArn": checkout.license_arn,
        "account": checkout.account,
        "callerKey": checkout.caller_key,
        "podUid": checkout.identity.get("podUid"),
        "podName": checkout.identity.get("podName"),
        "checkoutType": checkout.checkout_type,
        "entitlements": checkout.entitlements,
        "nodeId": checkout.node_id,
        "beneficiary": checkout.beneficiary,
        "issuedAt": _iso(checkout.issued_at),
        "expiration": _iso(checkout.expiration),
        "extensions": checkout.extended,
        "checkedInAt": _iso(checkout.checked_in_at),
        "state": checkout.state(now),
    }


def billing_report(
    ctx: EmulatorContext, product_code: str | None = None, license_arn: str | None = None
) -> dict[str, Any]:
    """What AWS would bill now: registered pods (hourly pricing), metered dimensions, and seats."""
    now = ctx.clock.timestamp()
    pods = [_pod_bill(ctx, reg, now) for reg in ctx.state.registrations(product_code)]
    dimensions = _dimension_bills(ctx, product_code)
    total_amount = round(sum(float(entry["amount"]) for entry in (*pods, *dimensions)), 6)
    return {
        "now": _iso(now),
        "pods": pods,
        "dimensions": dimensions,
        "licenses": _seat_usage(ctx, license_arn, now),
        "totalAmount": total_amount,
    }


def add_routes(app: web.Application, ctx: EmulatorContext) -> None:
    state = ctx.state
    app[READ_TIMEOUT_KEY] = ctx.config.limits.request_timeout_seconds

    async def health(_: web.Request) -> web.Response:
        return _ok({"ok": True, "now": ctx.clock.now().isoformat(), "region": ctx.config.region})

    async def registrations(request: web.Request) -> web.Response:
        rows = state.registrations(request.query.get("productCode"))
        return _ok({"registrations": _iso_fields(rows, "firstAt", "lastAt", "deregisteredAt")})

    async def meter_records(request: web.Request) -> web.Response:
        records = [
            {
                "meteringRecordId": r.record_id,
                "productCode": r.product_code,
                "callerKey": r.caller_key,
                "podUid": r.identity.get("podUid"),
                "podName": r.identity.get("podName"),
                "account": r.identity.get("accountId"),
                "dimension": r.dimension,
                "hour": _iso(r.hour),
                "quantity": r.quantity,
                "quantityIsDecimal": r.decimal,
                "allocations": r.allocations,
                "timestamp": _iso(r.timestamp),
                "createdAt": _iso(r.created_at),
            }
            for r in state.meter_records(request.query.get("productCode"))
        ]
        return _ok({"records": records})

    async def batch_records(request: web.Request) -> web.Response:
        rows = state.batch_records(request.query.get("productCode"))
        return _ok({"records": _iso_fields(rows, "hour", "timestamp", "createdAt")})

    async def billing(request: web.Request) -> web.Response:
        return _ok(billing_report(ctx, request.query.get("productCode"), request.query.get("licenseArn")))

    async def license_checkouts(request: web.Request) -> web.Response:
        now = ctx.clock.timestamp()
        rows = [_checkout_view(c, now) for c in state.checkouts(request.query.get("licenseArn"))]
        return _ok({"checkouts": rows})

    async def issuer_key(request: web.Request) -> web.StreamResponse:
        fingerprint = request.match_info["fingerprint"]
        if not any(lic.issuer.key_fingerprint == fingerprint for lic in ctx.config.licenses):
            return _bad(f"no license issuer with key fingerprint {fingerprint}", 404)
        return web.Response(
            text=ctx.keys.issuer_public_key_pem(fingerprint), content_type="application/x-pem-file"
        )

    async def deregister(request: web.Request) -> web.Response:
        body = await _json_body(request)
        pod_uid = body.get("podUid")
        if not isinstance(pod_uid, str) or not pod_uid:
            return _bad("podUid (string) is required")
        product = body.get("productCode")
        changed = state.deregister(
            pod_uid, product if isinstance(product, str) else None, ctx.clock.timestamp()
        )
        return _ok({"deregistered": changed, "at": _iso(ctx.clock.timestamp())})

    async def events(request: web.Request) -> web.Response:
        try:
            since = int(request.query.get("since", "0"))
            limit = int(request.query.get("limit", str(EVENTS_PAGE_DEFAULT)))
        except ValueError:
            return _bad("since and limit must be integers")
        if not 0 <= since < 2**63:  # SQLite integers are 64-bit
            return _bad("since must be from 0 to 2**63-1")
        if not 1 <= limit <= EVENTS_PAGE_MAX:
            # A page is held in memory as JSON; the log itself can be large.
            return _bad(f"limit must be from 1 to {EVENTS_PAGE_MAX} (page with since=nextSince)")
        rows = state.events(request.query.get("operation"), request.query.get("errorCode"), since, limit)
        # The next page starts after this one; a short page is the last.
        next_since = rows[-1]["seq"] if rows else since
        return _ok({"events": rows, "nextSince": next_since, "more": len(rows) == limit})

    async def credentials(_: web.Request) -> web.Response:
        return _ok({"credentials": _iso_fields(state.all_credentials(), "expiration")})

    async def get_faults(_: web.Request) -> web.Response:
        return _ok({"faults": ctx.faults.effective()})

    async def post_faults(request: web.Request) -> web.Response:
        body = await _json_body(request)
        operation = body.pop("operation", None)
        if operation != "*" and operation not in OPERATIONS:
            return _bad(f"operation must be one of {', '.join(OPERATIONS)} or *")
        try:
            fault = Fault.model_validate({k: v for k, v in body.items() if v is not None})
        except ValidationError as exc:
            return _bad(_pydantic_message(exc))
        ctx.faults.set(operation, fault)
        return _ok({"faults": ctx.faults.effective()})

    async def delete_faults(_: web.Request) -> web.Response:
        ctx.faults.clear()
        return _ok({"faults": ctx.faults.effective()})

    async def get_clock(_: web.Request) -> web.Response:
        return _ok({"now": ctx.clock.now().isoformat(), "offsetSeconds": ctx.clock.offset})

    async def post_clock(request: web.Request) -> web.Response:
        body = await _json_body(request)
        try:
            if body.get("real"):
                ctx.clock.reset()
            elif "now" in body:
                when = datetime.fromisoformat(str(body["now"]).replace("Z", "+00:00"))
                ctx.clock.set(when)
            elif "advanceSeconds" in body:
                ctx.clock.advance(
                    _number(body["advanceSeconds"], "advanceSeconds", -MAX_SECONDS, MAX_SECONDS)
                )
            else:
                return _bad("give one of now (ISO 8601 with zone), advanceSeconds, real")
        except ValueError as exc:
            return _bad(str(exc))
        return _ok({"now": ctx.clock.now().isoformat(), "offsetSeconds": ctx.clock.offset})

    async def get_config(_: web.Request) -> web.Response:
        return _ok(ctx.config.model_dump(by_alias=True, mode="json"))

    async def reload_config(_: web.Request) -> web.Response:
        try:
            config = ctx.reload()
        except ConfigError as exc:
            return _bad(str(exc))
        return _ok(config.model_dump(by_alias=True, mode="json"))

    def put(section: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            body = await _json_body(request)
            try:
                config = ctx.put(section, body)
            except ValidationError as exc:
                return _bad(_pydantic_message(exc))
            return _ok(config.model_dump(by_alias=True, mode="json"))

        return handler

    async def mint_token(request: web.Request) -> web.Response:
        body = await _json_body(request)
        product = body.get("productCode")
        account = body.get("customerAWSAccountId")
        if not isinstance(product, str) or not isinstance(account, str) or not account.isdigit():
            return _bad("productCode and customerAWSAccountId (digits) are required")
        expires_in = _number(body.get("expiresInSeconds", 3600), "expiresInSeconds", 0, MAX_SECONDS)
        token = secrets.token_urlsafe(24)
        expires_at = ctx.clock.timestamp() + expires_in
        state.add_registration_token(
            token,
            {
                "productCode": product,
                "customerAWSAccountId": account,
                "customerIdentifier": body.get("customerIdentifier"),
                "licenseArn": body.get("licenseArn"),
                "expiresAt": expires_at,
            },
        )
        return _ok({"token": token, "expiresAt": _iso(expires_at)})

    async def public_key(request: web.Request) -> web.StreamResponse:
        code = request.match_info["code"]
        try:
            version = int(request.match_info["version"])
        except ValueError:
            return _bad("version must be an integer")
        product = ctx.config.product(code)
        if product is None or product.key_version(version) is None:
            return _bad(f"no key version {version} for product {code}", 404)
        return web.Response(
            text=ctx.keys.public_key_pem(code, version), content_type="application/x-pem-file"
        )

    async def not_found(request: web.Request) -> web.Response:
        return _bad(f"no admin route {request.method} {request.path}", 404)

    r = app.router
    r.add_get(f"{PREFIX}/health", health)
    r.add_get(f"{PREFIX}/registrations", registrations)
    r.add_get(f"{PREFIX}/meter-records", meter_records)
    r.add_get(f"{PREFIX}/batch-records", batch_records)
    r.add_get(f"{PREFIX}/billing", billing)
    r.add_post(f"{PREFIX}/deregistrations", deregister)
    r.add_get(f"{PREFIX}/events", events)
    r.add_get(f"{PREFIX}/credentials", credentials)
    r.add_get(f"{PREFIX}/faults", get_faults)
    r.add_post(f"{PREFIX}/faults", post_faults)
    r.add_delete(f"{PREFIX}/faults", delete_faults)
    r.add_get(f"{PREFIX}/clock", get_clock)
    r.add_post(f"{PREFIX}/clock", post_clock)
    r.add_get(f"{PREFIX}/config", get_config)
    r.add_post(f"{PREFIX}/config/reload", reload_config)
    r.add_post(f"{PREFIX}/products", put("products"))
    r.add_post(f"{PREFIX}/roles", put("roles"))
    r.add_post(f"{PREFIX}/issuers", put("issuers"))
    r.add_post(f"{PREFIX}/static-credentials", put("staticCredentials"))
    r.add_post(f"{PREFIX}/registration-tokens", mint_token)
    r.add_post(f"{PREFIX}/licenses", put("licenses"))
    r.add_get(f"{PREFIX}/license-checkouts", license_checkouts)
    r.add_get(PREFIX + "/license-issuers/{fingerprint:.+}/key.pem", issuer_key)
    r.add_get(PREFIX + r"/products/{code:.+}/keys/{version:\d+}.pem", public_key)
    r.add_route("*", PREFIX + "/{tail:.*}", not_found)
