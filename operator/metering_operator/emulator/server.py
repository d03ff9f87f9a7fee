"""The aiohttp application: one port for the Metering and License Manager JSON 1.1 APIs, the STS
query API and the admin API.

Requests with ``X-Amz-Target`` are Metering (``AWSMPMeteringService.*``) or License Manager
(``AWSLicenseManager.*``), both JSON 1.1; form posts with ``Action=`` are STS;
``/_emulator/`` is the admin API. Every AWS call is written to the event log, whatever its
outcome. Any input, however malformed, gets an AWS error shape: an unexpected exception is
logged here and answered as InternalServiceError without a stack trace, and the server lives on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import sys
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from metering_operator.emulator import admin, bounds, licensing, metering, page, sts, validation
from metering_operator.emulator.config import LICENSE_MANAGER_OPERATIONS
from metering_operator.emulator.context import EmulatorContext
from metering_operator.emulator.errors import AwsError, json_error, xml_error
from metering_operator.emulator.identity import Caller, authenticate
from metering_operator.emulator.sigv4 import IncomingRequest

log = logging.getLogger("metering_operator.emulator")


Handler = Callable[[EmulatorContext, Caller, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class JsonService:
    """One JSON 1.1 service: its botocore model, SigV4 signing name, event source and operations."""

    model: str
    signing_name: str | None  # checked against the credential scope when set
    event_source: str
    operations: dict[str, Handler]
    exempt_shapes: frozenset[str] = frozenset()


JSON_SERVICES: dict[str, JsonService] = {
    "AWSMPMeteringService.": JsonService(
        "meteringmarketplace",
        None,
        "metering-marketplace",
        {
            "RegisterUsage": metering.register_usage,
            "MeterUsage": metering.meter_usage,
            "BatchMeterUsage": metering.batch_meter_usage,
            "ResolveCustomer": metering.resolve_customer,
        },
        metering.EXEMPT_SHAPES,
    ),
    "AWSLicenseManager.": JsonService(
        "license-manager",
        licensing.SERVICE,
        "license-manager",
        {
            "CheckoutLicense": licensing.checkout_license,
            "ExtendLicenseConsumption": licensing.extend_license_consumption,
            "CheckInLicense": licensing.check_in_license,
            "GetLicense": licensing.get_license,
            "ListReceivedLicenses": licensing.list_received_licenses,
        },
    ),
}
CONTEXT_KEY: web.AppKey[EmulatorContext] = web.AppKey("context", EmulatorContext)


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        return {}
    try:
        return validation.strict_json(raw)
    except (ValueError, RecursionError):
        raise AwsError("SerializationException", "The request body is not valid JSON.") from None


def _incoming(request: web.Request, raw: bytes) -> IncomingRequest:
    return IncomingRequest(request.method, request.raw_path, request.headers, raw)


def _product_of(body: Any) -> str | None:
    if isinstance(body, dict):
        code = body.get("ProductCode") or body.get("ProductSKU")
        if isinstance(code, str):
            return code
    return None


class AwsFrontend:
    def __init__(self, ctx: EmulatorContext) -> None:
        self.ctx = ctx
        # Read once, like the server's keep-alive timeout: a config reload does not change it.
        self.read_timeout = ctx.config.limits.request_timeout_seconds

    async def handle(self, request: web.Request) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        started = time.monotonic()
        timeout = self.read_timeout
        try:
            raw = await bounds.read_body(request, timeout)
        except bounds.BodyTimeout:
            log.warning("request body not received within %gs: connection closed", timeout)
            return bounds.request_timeout_response(timeout)
        except web.HTTPRequestEntityTooLarge:
            err = AwsError("SerializationException", "The request body is larger than 1 MB.", 413)
            return json_error(err, request_id)
        except Exception as exc:  # the client went away or sent a broken body: nobody to answer
            log.warning("could not read request body: %s", exc.__class__.__name__)
            return json_error(
                AwsError("SerializationException", "The request body could not be read."), request_id
            )
        if "X-Amz-Target" in request.headers:
            return await self._json(request, raw, request_id, started)
        if len(raw) > bounds.MAX_QUERY_BODY:
            # Only the JSON protocol carries large bodies (BatchMeterUsage); an STS form is small.
            err = AwsError("ValidationError", "The request body is larger than 64 KB.", 413)
            self._record("Unknown", request, request_id, None, None, None, err, started, "sts")
            return xml_error(err, request_id)
        params = self._query_params(request, raw)
        if params is not None and "Action" in params:
            return await self._query(request, raw, params, request_id, started)
        err = AwsError(
            "UnknownOperationException", "No X-Amz-Target header or Action parameter in the request."
        )
        self._record("Unknown", request, request_id, None, {}, None, err, started)
        return json_error(err, request_id)

    # -- JSON 1.1 (Metering) ---------------------------------------------------------------
    async def _json(self, request: web.Request, raw: bytes, request_id: str, started: float) -> web.Response:
        target = request.headers.get("X-Amz-Target", "")
        prefix, _, operation = target.partition(".")
        service = JSON_SERVICES.get(prefix + ".")
        handler = service.operations.get(operation) if service else None
        source = service.event_source if service else "metering-marketplace"
        caller: Caller | None = None
        body: Any = None
        try:
            if service is None or handler is None or request.method != "POST" or request.path != "/":
                raise AwsError("UnknownOperationException", f"Unknown operation {target[:100]!r}.")
            unknown_key = None
            if operation == "RegisterUsage":
                # AWS answers any non-IRSA caller of RegisterUsage this way.
                unknown_key = AwsError(
                    "PlatformNotSupportedException",
                    "RegisterUsage can only be called from within an ECS task or an EKS pod.",
                )
            caller = authenticate(
                self.ctx.config,
                self.ctx.state,
                _incoming(request, raw),
                dialect="json",
                unknown_key_error=unknown_key,
                service=service.signing_name,
            )
            body = _parse_json(raw)
            product_code = body.get("ProductCode") if isinstance(body, dict) else None
            await self.ctx.faults.apply(operation, product_code if isinstance(product_code, str) else None)
            validation.validate(service.model, operation, body, service.exempt_shapes)
            result = handler(self.ctx, caller, body)
        except AwsError as err:
            name = operation or "Unknown"
            self._record(name, request, request_id, caller, body, None, err, started, source)
            return json_error(err, request_id)
        except Exception:
            return self._unexpected(operation, request, request_id, caller, body, started)
        self._record(operation, request, request_id, caller, body, result, None, started, source)
        product_code = body.get("ProductCode") if isinstance(body, dict) else None
        await self.ctx.faults.delay_answer(operation, product_code if isinstance(product_code, str) else None)
        return web.Response(
            body=json.dumps(result).encode(),
            content_type="application/x-amz-json-1.1",
            headers={"x-amzn-RequestId": request_id},
        )

    # -- query protocol (STS) --------------------------------------------------------------
    @staticmethod
    def _query_params(request: web.Request, raw: bytes) -> dict[str, str] | None:
        params: dict[str, str] = {}
        try:
            for key, value in urllib.parse.parse_qsl(request.query_string, keep_blank_values=True):
                params[key] = value
            if raw and "json" not in request.content_type:
                text = raw.decode("utf-8")
                for key, value in urllib.parse.parse_qsl(text, keep_blank_values=True):
                    params[key] = value
        except (UnicodeDecodeError, ValueError):
            return None
        return params

    async def _query(
        self, request: web.Request, raw: bytes, params: dict[str, str], request_id: str, started: float
    ) -> web.Response:
        action = params.get("Action", "")
        logged = {k: (v[:16] + "..." if k == "WebIdentityToken" else v) for k, v in params.items()}
        identity: dict[str, Any] | None = None
        caller: Caller | None = None
        try:
            if action == "AssumeRoleWithWebIdentity":
                await self.ctx.faults.apply(action)
                identity, xml = await sts.assume_role_with_web_identity(
                    self.ctx.config, self.ctx.state, self.ctx.resolver, params
                )
            elif action == "GetCallerIdentity":
                caller = authenticate(
                    self.ctx.config, self.ctx.state, _incoming(request, raw), dialect="query"
                )
                await self.ctx.faults.apply(action)
                user_id = caller.info.get("assumedRoleId") or (
                    "AIDA" + hashlib.sha256(caller.arn.encode()).hexdigest()[:17].upper()
                )
                xml = sts.get_caller_identity(str(user_id), caller.account, caller.arn)
            else:
                raise AwsError(
                    "InvalidAction", f"Could not find operation {action[:100]} for version 2011-06-15"
                )
        except AwsError as err:
            self._record(action or "Unknown", request, request_id, caller, logged, None, err, started, "sts")
            return xml_error(err, request_id)
        except Exception:
            return self._unexpected(action, request, request_id, caller, logged, started, xml=True)
        response = {"assumedRoleUser": identity} if identity else None
        self._record(action, request, request_id, caller, logged, response, None, started, "sts", identity)
        return web.Response(
            body=xml.encode(), content_type="text/xml", headers={"x-amzn-RequestId": request_id}
        )

    # -- bookkeeping -----------------------------------------------------------------------
    def _unexpected(
        self,
        operation: str,
        request: web.Request,
        request_id: str,
        caller: Caller | None,
        body: Any,
        started: float,
        *,
        xml: bool = False,
    ) -> web.Response:
        # A bug, not an input problem: keep the trace in our log, never in the answer.
        log.error("unexpected error in %s (request %s):\n%s", operation, request_id, traceback.format_exc())
        if xml:
            code = "InternalFailure"
        elif operation in LICENSE_MANAGER_OPERATIONS:
            code = "ServerInternalException"
        else:
            code = "InternalServiceErrorException"
        err = AwsError(code, "An internal error has occurred.", 500)
        with contextlib.suppress(Exception):
            self._record(operation or "Unknown", request, request_id, caller, body, None, err, started)
        return xml_error(err, request_id) if xml else json_error(err, request_id)

    def _record(
        self,
        operation: str,
        request: web.Request,
        request_id: str,
        caller: Caller | None,
        params: Any,
        response: Any,
        err: AwsError | None,
        started: float,
        source: str = "metering-marketplace",
        sts_identity: dict[str, Any] | None = None,
    ) -> None:
        identity = (
            caller.describe()
            if caller
            else ({"type": "WebIdentityUser", **sts_identity} if sts_identity else None)
        )
        if identity is None and isinstance(params, dict):
            # Nobody proved who sent this: keep a bounded trace, not the whole request.
            params = bounds.unauthenticated(params)
        event = {
            "eventTime": self.ctx.clock.now().isoformat(),
            "wallTime": datetime.now(UTC).isoformat(),
            "eventSource": f"{source}.amazonaws.com",
            "eventName": operation,
            "awsRegion": caller.region if caller else None,
            "sourceIPAddress": request.remote,
            "userAgent": request.headers.get("User-Agent"),
            "requestID": request_id,
            "userIdentity": identity,
            "requestParameters": bounds.logged_parameters(params),
            "responseElements": response,
            "errorCode": err.code if err else None,
            "errorMessage": err.message if err else None,
            "httpStatus": err.status if err else 200,
            "injected": bool(err and err.injected),
            "durationMs": round((time.monotonic() - started) * 1000, 3),
        }
        limits = self.ctx.config.limits
        self.ctx.state.add_event(
            operation,
            err.code if err else None,
            _product_of(params),
            event,
            logged_at=time.time(),
            max_events=limits.max_events,
            max_age_seconds=limits.max_event_age_seconds,
        )


def create_app(ctx: EmulatorContext) -> web.Application:
    app = web.Application(client_max_size=bounds.MAX_JSON_BODY)
    app[CONTEXT_KEY] = ctx
    frontend = AwsFrontend(ctx)
    page.add_routes(app, ctx)  # before the admin API's catch-all under the same prefix
    admin.add_routes(app, ctx)
    app.router.add_route("*", "/{tail:.*}", frontend.handle)
    return app


async def serve(
    ctx: EmulatorContext,
    host: str,
    port: int,
    announce: Callable[[str], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set); ``announce`` gets the URL once listening."""
    app = create_app(ctx)
    # keepalive_timeout also bounds a connection whose request headers never finish arriving
    # (aiohttp arms it when the connection opens); bodies are bounded in bounds.read_body.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        keepalive_timeout=ctx.config.limits.request_timeout_seconds,
        # After an early answer (408, 413), how long the rest of a body may still be drained.
        lingering_time=2.0,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = port
    for address in runner.addresses:  # the real port when 0 was asked for
        if isinstance(address, tuple) and len(address) >= 2:
            bound_port = int(address[1])
            break
    display_host = f"[{host}]" if ":" in host else host
    announce(f"http://{display_host}:{bound_port}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        ctx.state.close()


class _MalformedHttpFilter(logging.Filter):
    """aiohttp logs unparseable HTTP (answered 400 by its parser) with a traceback; one line is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = (
                "malformed HTTP from client answered 400: %s",
                (exc.message.splitlines()[0],),
            )
        return True


def run(config_path: Path | None, state_dir: Path, host: str, port: int) -> int:
    from metering_operator.emulator.config import ConfigError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_MalformedHttpFilter())
    try:
        ctx = EmulatorContext(config_path, state_dir)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    def announce(url: str) -> None:
        print(f"emulator listening on {url}", flush=True)

    asyncio.run(serve(ctx, host, port, announce))
    return 0
