"""``LicenseManagerClient``: the License Manager operations of contract products, typed, over boto3.

Like :mod:`metering_operator.aws.client` for the Metering Service: boto3 stays the transport
(SigV4 with signing name ``license-manager``, endpoints, ``AWS_ENDPOINT_URL_LICENSE_MANAGER``),
botocore's own retries are off by default (the caller retries with
:class:`metering_operator.aws.backoff.Backoff`, visibly), every call is timed into the same metrics
and every failure becomes a :class:`~metering_operator.aws.errors.MeteringError` with a category
from the exhaustive table in :mod:`metering_operator.aws.errors`. The Region is always given,
never assumed. Every call blocks: run it from a worker thread, never on kopf's event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config

from metering_operator.aws import errors
from metering_operator.aws.client import Credentials, ServiceClientFactory, call_aws, client_config
from metering_operator.aws.license_models import (
    CheckInLicenseRequest,
    CheckoutLicenseRequest,
    CheckoutLicenseResult,
    ExtendLicenseConsumptionRequest,
    ExtendLicenseConsumptionResult,
    GetLicenseRequest,
    GetLicenseResult,
    ListReceivedLicensesRequest,
    ListReceivedLicensesResult,
)
from metering_operator.aws.region import require_region
from metering_operator.aws.sessions import new_session

SERVICE_NAME = "license-manager"


class LicenseManagerClient:
    """Typed wrapper of one boto3 ``license-manager`` client (thread-safe, like boto3 clients)."""

    def __init__(self, boto_client: Any) -> None:
        service = boto_client.meta.service_model.service_name
        if service != SERVICE_NAME:
            raise ValueError(f"expected a {SERVICE_NAME!r} client, got {service!r}")
        self._client = boto_client

    @classmethod
    def create(
        cls,
        region: str,
        *,
        session: boto3.Session | None = None,
        endpoint_url: str | None = None,
        config: Config | None = None,
    ) -> LicenseManagerClient:
        """A client in ``region`` (required). ``endpoint_url`` None lets boto3 apply the environment."""
        require_region(region, "the License Manager client")
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

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> LicenseManagerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- operations ---------------------------------------------------------------------------
    def checkout_license(self, request: CheckoutLicenseRequest) -> CheckoutLicenseResult:
        response = self._call(errors.CHECKOUT_LICENSE, "checkout_license", request.to_boto())
        return CheckoutLicenseResult.from_boto(response)

    def extend_license_consumption(
        self, request: ExtendLicenseConsumptionRequest
    ) -> ExtendLicenseConsumptionResult:
        response = self._call(
            errors.EXTEND_LICENSE_CONSUMPTION, "extend_license_consumption", request.to_boto()
        )
        return ExtendLicenseConsumptionResult.from_boto(response)

    def check_in_license(self, request: CheckInLicenseRequest) -> None:
        self._call(errors.CHECK_IN_LICENSE, "check_in_license", request.to_boto())

    def get_license(self, request: GetLicenseRequest) -> GetLicenseResult:
        response = self._call(errors.GET_LICENSE, "get_license", request.to_boto())
        return GetLicenseResult.from_boto(response)

    def list_received_licenses(self, request: ListReceivedLicensesRequest) -> ListReceivedLicensesResult:
        response = self._call(errors.LIST_RECEIVED_LICENSES, "list_received_licenses", request.to_boto())
        return ListReceivedLicensesResult.from_boto(response)

    def _call(self, operation: str, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return call_aws(operation, getattr(self._client, method), params)


class LicenseManagerClientFactory(ServiceClientFactory[LicenseManagerClient]):
    """Builds :class:`LicenseManagerClient` objects for one Region and endpoint from one session.

    A client for a pod's temporary credentials costs milliseconds (the model is loaded once).
    """

    service_name = SERVICE_NAME
    purpose = "the License Manager client factory"

    def for_credentials(self, credentials: Credentials) -> LicenseManagerClient:
        """A client signing with ``credentials`` (a pod's IRSA session, scope Pod)."""
        with self._lock:
            return self._build(
                {
                    "aws_access_key_id": credentials.access_key_id,
                    "aws_secret_access_key": credentials.secret_access_key,
                    "aws_session_token": credentials.session_token,
                }
            )

    def _wrap(self, boto_client: Any) -> LicenseManagerClient:
        return LicenseManagerClient(boto_client)
