"""AWS error shapes: one exception type, rendered as JSON 1.1 or as STS query-protocol XML.

botocore maps the JSON ``__type`` (and the XML ``Error/Code``) to ``client.exceptions.<Name>``;
codes that the service model does not define (auth errors, DryRunOperation) surface as a
generic ``ClientError`` carrying the code, exactly as with AWS.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

from aiohttp import web

STS_NAMESPACE = "https://sts.amazonaws.com/doc/2011-06-15/"

# HTTP status per code where AWS does not answer 400.
_STATUS = {
    "InternalServiceErrorException": 500,
    "ServerInternalException": 500,
    "AuthorizationException": 403,
    "InternalFailure": 500,
    "ServiceUnavailable": 503,
    "IdempotencyConflictException": 409,
    "MissingAuthenticationTokenException": 403,
    "MissingAuthenticationToken": 403,
    "IncompleteSignatureException": 403,
    "IncompleteSignature": 403,
    "InvalidSignatureException": 403,
    "SignatureDoesNotMatch": 403,
    "UnrecognizedClientException": 403,
    "InvalidClientTokenId": 403,
    "AccessDeniedException": 403,
    "AccessDenied": 403,
    "UnauthorizedException": 403,
    "IDPRejectedClaim": 403,
    "RequestEntityTooLargeException": 413,
}


class AwsError(Exception):
    """An error answer. ``injected`` marks faults from fault injection (for the event log)."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None = None,
        *,
        injected: bool = False,
        extra: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status if status is not None else _STATUS.get(code, 400)
        self.injected = injected
        # Members the error shape has besides the message (RedirectException's Location).
        self.extra = dict(extra or {})


def json_error(err: AwsError, request_id: str) -> web.Response:
    body = json.dumps({"__type": err.code, "message": err.message, **err.extra})
    return web.Response(
        status=err.status,
        body=body.encode(),
        content_type="application/x-amz-json-1.1",
        headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": err.code},
    )


def xml_error(err: AwsError, request_id: str) -> web.Response:
    kind = "Receiver" if err.status >= 500 else "Sender"
    body = (
        f'<ErrorResponse xmlns="{STS_NAMESPACE}">'
        f"<Error><Type>{kind}</Type><Code>{escape(err.code)}</Code>"
        f"<Message>{escape(err.message)}</Message></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
    return web.Response(
        status=err.status,
        body=body.encode(),
        content_type="text/xml",
        headers={"x-amzn-RequestId": request_id},
    )
