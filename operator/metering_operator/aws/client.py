"""``MeteringClient``: the four Metering operations, typed, over an unmodified boto3 client.

boto3 stays the transport (SigV4, endpoints, ``AWS_ENDPOINT_URL_MARKETPLACE_METERING``); this
module only adds typed requests/results, one error type with a category, and metrics. Every call
blocks: run it from a sync handler or ``asyncio.to_thread``, never on kopf's event loop.

Retries: botocore's retries are off (``total_max_attempts=1``) by default. The operator retries
throttling and internal errors itself, with full-jitter backoff and a visible state (``Pending``
with a reason, ledger ``attempts``); botocore retrying underneath would multiply attempts
(operator retries x botocore attempts), hide throttling from the error metric and stretch a single
call to many seconds while a kopf worker waits. Callers without their own loop (a CLI, a seller's
script) can pass ``max_attempts`` > 1 to get botocore's "standard" mode back.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from typing import Any, Generic, Protocol, TypeVar

import boto3
from botocore.config import Config
from botocore.credentials import Credentials as BotoCredentials

from metering_operator import metrics
from metering_operator.aws import errors
from metering_operator.aws.models import (
    BatchMeterUsageRequest,
    BatchMeterUsageResult,
    MeterUsageRequest,
    MeterUsageResult,
    RegisterUsageRequest,
    RegisterUsageResult,
    ResolveCustomerRequest,
    ResolveCustomerResult,
)
from metering_operator.aws.region import require_region
from metering_operator.aws.sessions import new_session

SERVICE_NAME = "meteringmarketplace"
USER_AGENT = "marketplace-metering-operator"

# A RegisterUsage holds a pod behind its gate, so a dead endpoint must fail fast and be retried
# by the operator; the read timeout leaves room for AWS's slow tail. The metering runtime passes
# its own, shorter timeouts (`--aws-read-timeout-seconds`, default 5 s): a MeterUsage whose answer
# is lost leaves its hour Unknown until a resend is answered, so a lost answer must be noticed in
# seconds.
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 15.0
# Enough pooled connections for the operator's worker threads sharing one client.
DEFAULT_MAX_POOL_CONNECTIONS = 32


def client_config(
    *,
    max_attempts: int = 1,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
    **extra: Any,
) -> Config:
    """The botocore ``Config`` used for Metering (and STS) clients; see the module docstring."""
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
    return Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
        user_agent_extra=USER_AGENT,
        **extra,
    )


class Credentials(Protocol):
    """Anything carrying AWS credentials, e.g. :class:`metering_operator.aws.irsa.WebIdentityCredentials`."""

    @property
    def access_key_id(self) -> str: ...
    @property
    def secret_access_key(self) -> str: ...
    @property
    def session_token(self) -> str | None: ...


#: The credentials a call on a shared per-call client signs with (see :class:`PerCallSigning`).
_CALL_CREDENTIALS: ContextVar[BotoCredentials | None] = ContextVar("metering_call_credentials", default=None)


class PerCallSigning:
    """One boto3 client whose calls each sign with credentials given for that call.

    A client per pod (each pod has its own IRSA session) cost more operator CPU than the call:
    building it (about 3 ms), a new connection pool and TLS context, and cold per-client caches
    (endpoint rules, auth scheme) on its one call. botocore's signer takes per-request
    credentials from the request's signing context; a ``before-sign`` handler puts the call's
    credentials there from a context variable, which the calling thread sets around the call
    (:meth:`signing_with`), so concurrent calls from other threads never see them. A call with no
    credentials set fails instead of signing with anything else.
    """

    def __init__(self, boto_client: Any) -> None:
        self.client = boto_client
        service_id = boto_client.meta.service_model.service_id.hyphenize()
        boto_client.meta.events.register(f"before-sign.{service_id}", self._sign_with_call_credentials)

    @staticmethod
    def _sign_with_call_credentials(request: Any, **_: Any) -> None:
        credentials = _CALL_CREDENTIALS.get()
        if credentials is None:
            raise RuntimeError("a per-call Metering client was called without credentials")
        request.context.setdefault("signing", {})["request_credentials"] = credentials

    @staticmethod
    @contextlib.contextmanager
    def signing_with(credentials: BotoCredentials) -> Iterator[None]:
        token = _CALL_CREDENTIALS.set(credentials)
        try:
            yield
        finally:
            _CALL_CREDENTIALS.reset(token)


class MeteringClient:
    """Typed wrapper of one boto3 ``meteringmarketplace`` client (thread-safe, like boto3 clients).

    With ``call_credentials`` the client is a view of a shared :class:`PerCallSigning` client whose
    every call signs with these credentials.
    """

    def __init__(self, boto_client: Any, call_credentials: BotoCredentials | None = None) -> None:
        service = boto_client.meta.service_model.service_name
        if service != SERVICE_NAME:
            raise ValueError(f"expected a {SERVICE_NAME!r} client, got {service!r}")
        self._client = boto_client
        self._call_credentials = call_credentials

    @classmethod
    def create(
        cls,
        region: str,
        *,
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        config: Config | None = None,
    ) -> MeteringClient:
        """A client in ``region`` (required: see :mod:`metering_operator.aws.region`).

        ``session`` defaults to :func:`new_session` (the default credential chain, i.e. the
        operator's own IRSA identity in a cluster). ``endpoint_url`` None lets boto3 apply
        ``AWS_ENDPOINT_URL_MARKETPLACE_METERING`` / ``AWS_ENDPOINT_URL``.
        """
        require_region(region, "the Metering client")
        session = session or new_session()
        boto_client = session.client(
            SERVICE_NAME, region_name=region, endpoint_url=endpoint_url, config=config or client_config()
        )
        return cls(boto_client)

    @property
    def boto_client(self) -> Any:
        return self._client

    @property
    def region(self) -> str:
        return str(self._client.meta.region_name)

    @property
    def endpoint_url(self) -> str:
        return str(self._client.meta.endpoint_url)

    def close(self) -> None:
        """Release the client's pooled connections; a view of a shared client leaves them to it."""
        if self._call_credentials is None:
            self._client.close()

    def __enter__(self) -> MeteringClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- operations ---------------------------------------------------------------------------
    def register_usage(self, request: RegisterUsageRequest) -> RegisterUsageResult:
        response = self._call(errors.REGISTER_USAGE, "register_usage", request.to_boto())
        return RegisterUsageResult.from_boto(response)

    def meter_usage(self, request: MeterUsageRequest) -> MeterUsageResult:
        """Send one hour of one dimension. A successful dry run returns ``dry_run=True``."""
        try:
            response = self._call(errors.METER_USAGE, "meter_usage", request.to_boto())
        except errors.MeteringError as exc:
            # AWS answers a permitted dry run with an *error* code; for the caller it is success.
            if request.dry_run and exc.code == errors.DRY_RUN_OPERATION:
                return MeterUsageResult(dry_run=True)
            raise
        return MeterUsageResult.from_boto(response)

    def batch_meter_usage(self, request: BatchMeterUsageRequest) -> BatchMeterUsageResult:
        response = self._call(errors.BATCH_METER_USAGE, "batch_meter_usage", request.to_boto())
        return BatchMeterUsageResult.from_boto(response)

    def resolve_customer(self, request: ResolveCustomerRequest) -> ResolveCustomerResult:
        response = self._call(errors.RESOLVE_CUSTOMER, "resolve_customer", request.to_boto())
        return ResolveCustomerResult.from_boto(response)

    # -- plumbing -----------------------------------------------------------------------------
    def _call(self, operation: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if self._call_credentials is None:
            return call_aws(operation, getattr(self._client, method), params)
        with PerCallSigning.signing_with(self._call_credentials):
            return call_aws(operation, getattr(self._client, method), params)


def call_aws(operation: str, method: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """Call a boto3 client method, timing it into the metrics and translating its errors."""
    started = time.perf_counter()
    try:
        response: dict[str, Any] = method(**params)
    except Exception as exc:
        metrics.AWS_CALL_LATENCY.labels(operation).observe(time.perf_counter() - started)
        error = errors.from_exception(operation, exc)
        if error.code != errors.DRY_RUN_OPERATION:
            metrics.AWS_CALL_ERRORS.labels(operation, error.code).inc()
        raise error from exc
    metrics.AWS_CALL_LATENCY.labels(operation).observe(time.perf_counter() - started)
    return response


C = TypeVar("C")


class ServiceClientFactory(Generic[C]):
    """Builds wrapped boto3 clients of one service for one Region and endpoint from one session.

    The operator's own client (:meth:`default`) is built once and shared. One session loads the
    service model once; boto3 sessions are not thread-safe, hence the lock. Subclasses name the
    service and wrap the boto3 client in their typed adapter.
    """

    #: botocore's service name, e.g. ``meteringmarketplace``.
    service_name: str
    #: Said in the error when no Region is given.
    purpose: str

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        config: Config | None = None,
    ) -> None:
        self.region = require_region(region, self.purpose)
        self.endpoint_url = endpoint_url
        self._session = session or new_session()
        self._config = config or client_config()
        self._lock = threading.Lock()
        self._default: C | None = None

    def default(self) -> C:
        """The operator's own identity (default credential chain); built once, then shared."""
        with self._lock:
            if self._default is None:
                self._default = self._build({})
            return self._default

    def _wrap(self, boto_client: Any) -> C:
        raise NotImplementedError

    def _build(self, credential_kwargs: Mapping[str, Any]) -> C:
        return self._wrap(
            self._session.client(
                self.service_name,
                region_name=self.region,
                endpoint_url=self.endpoint_url,
                config=self._config,
                **credential_kwargs,
            )
        )


class MeteringClientFactory(ServiceClientFactory[MeteringClient]):
    """Builds :class:`MeteringClient` objects for one Region and endpoint.

    Clients for temporary credentials (:meth:`for_credentials`, one per pod) are views of one
    shared client that sign each call with their credentials (:class:`PerCallSigning`): building
    nothing per pod.
    """

    service_name = SERVICE_NAME
    purpose = "the Metering client factory"

    def __init__(
        self,
        region: str,
        *,
        endpoint_url: str | None = None,
        session: boto3.Session | None = None,
        config: Config | None = None,
    ) -> None:
        super().__init__(region, endpoint_url=endpoint_url, session=session, config=config)
        self._per_call: PerCallSigning | None = None

    def for_credentials(self, credentials: Credentials) -> MeteringClient:
        """A client signing with ``credentials`` (for example a pod's IRSA session)."""
        with self._lock:
            if self._per_call is None:
                # Explicit placeholder keys keep the default credential chain (the operator's own
                # identity) out of this client; its calls never sign with them (PerCallSigning).
                placeholder = {"aws_access_key_id": "per-call", "aws_secret_access_key": "per-call"}
                self._per_call = PerCallSigning(self._build(placeholder).boto_client)
            shared = self._per_call.client
        frozen = BotoCredentials(
            credentials.access_key_id, credentials.secret_access_key, credentials.session_token
        )
        return MeteringClient(shared, call_credentials=frozen)

    def _wrap(self, boto_client: Any) -> MeteringClient:
        return MeteringClient(boto_client)
