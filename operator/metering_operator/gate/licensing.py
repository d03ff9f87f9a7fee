"""License Manager for the gate: one CheckoutLicense, ExtendLicenseConsumption or CheckInLicense.

Blocking (TokenRequest, STS, License Manager, the seat record): runs in the gate's AWS worker
threads, one attempt per call -- retries are the state machine's
(:mod:`metering_operator.gate.machine`), with the gate's one backoff.

Whose identity: a scope ``Pod`` product's per-pod entitlements are checked out, extended and
checked in with the pod's own IRSA session (TokenRequest bound to the pod -> STS web identity, as
RegisterUsage does); once the pod is gone, its service account's token (not bound to the pod)
buys the same role's session for the check-in. Scope ``Cluster`` (and per-cluster entitlements)
use the operator's own identity.

A checkout is: CheckoutLicense (ClientToken derived from the holder and its checkout count, so a
retried call holds no second seat) -> verify the SignedToken
(:func:`metering_operator.domain.license_token.verify_license_token`) -> write the operator's seat
record (:mod:`metering_operator.kube.seat_records`) -> the pod may be released. A token that does
not verify, or a record that cannot be written, is checked in again at once (best effort: else AWS
returns the seat when the lease expires). When the MeteredProduct is deleted, its live provisional
leases are checked in (:meth:`Licensing.release_all`); when the operator merely stops, they are
kept for the next start to extend.

NoEntitlementsAllowed is ambiguous (no seat free now, or not entitled at all):
:func:`metering_operator.domain.license_seats.judge_refusal` settles it from ListReceivedLicenses.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from decimal import Decimal

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from kubernetes.client.rest import ApiException

from metering_operator import metrics
from metering_operator.aws import errors as aws_errors
from metering_operator.aws.license_manager import LicenseManagerClient, LicenseManagerClientFactory
from metering_operator.aws.license_models import (
    CheckInLicenseRequest,
    CheckoutLicenseRequest,
    CheckoutLicenseResult,
    EntitlementData,
    ExtendLicenseConsumptionRequest,
    Filter,
    ListReceivedLicensesRequest,
)
from metering_operator.aws.license_models import CheckoutType as AwsCheckoutType
from metering_operator.domain.clock import Clock
from metering_operator.domain.license_seats import (
    CLUSTER_HOLDER,
    HeldSeat,
    NeededEntitlement,
    OfferedEntitlement,
    OfferedLicense,
    Refusal,
    SeatLease,
    client_token,
    judge_refusal,
)
from metering_operator.domain.license_token import (
    CheckoutExpectation,
    LicenseTokenError,
    RequiredEntitlement,
    verify_license_token,
)
from metering_operator.domain.product import CheckoutType, LicenseEntitlement, LicenseManagerSource
from metering_operator.gate.registrar import Registrar, RegistrationSetupError
from metering_operator.kube.seat_records import SeatRecords
from metering_operator.kube.tokens import request_pod_token

log = logging.getLogger(__name__)


class _PodGone(Exception):
    """The pod is gone and its IRSA session is not cached: no token can be minted for it."""


class PodGoneError(Exception):
    """The pod to check out for is gone."""


class SeatsExhausted(Exception):
    """No seat is free now (the license has the entitlement): wait and try again."""


class LicenseRefused(Exception):
    """A final answer: the buyer's license does not cover the request."""


def needed(source: LicenseManagerSource, cluster: bool) -> list[LicenseEntitlement]:
    """The entitlements a pod (``cluster`` False) or the product (True) checks out."""
    return [e for e in source.entitlements if (e.per_cluster if cluster else e.per_pod) is not None]


def _amount(entitlement: LicenseEntitlement, cluster: bool) -> int:
    return int((entitlement.per_cluster if cluster else entitlement.per_pod) or 1)


class Licensing:
    """Checkouts, extensions and check-ins for the gate's product controllers (thread-safe)."""

    def __init__(self, registrar: Registrar, records: SeatRecords, region: str, clock: Clock) -> None:
        self.registrar = registrar
        self.records = records
        self.factory = LicenseManagerClientFactory(region)
        self.clock = clock
        #: holder -> the checkout number whose checkout went back (checked in) unused. The next
        #: attempt must use a later ClientToken: with the same one License Manager would replay
        #: the answer of the checkout just checked in, a lease that no longer holds a seat.
        self._returned: dict[str, int] = {}
        self._returned_lock = threading.Lock()

    # -- identities ------------------------------------------------------------------------

    def _pod_client(
        self, namespace: str, service_account: str, uid: str, pod_name: str | None
    ) -> LicenseManagerClient:
        role_arn = self.registrar.role_arn(namespace, service_account)
        if not role_arn:
            raise RegistrationSetupError(
                "MissingRoleArn",
                f"service account {namespace}/{service_account} has no IRSA role annotation: "
                "the pod cannot check a license out with its own identity",
            )
        api = self.registrar.api
        expiration = self.registrar.token_expiration_seconds

        def mint() -> str:
            # Only tokens bound to the pod (the operator's admission policy allows no other kind).
            try:
                return request_pod_token(
                    api,
                    namespace=namespace,
                    service_account=service_account,
                    pod_name=pod_name or "",
                    pod_uid=uid,
                    expiration_seconds=expiration,
                )
            except ApiException as exc:
                if exc.status in (400, 404, 409, 422):
                    raise _PodGone(uid) from None
                raise

        return self.factory.for_credentials(self.registrar.credentials.get(role_arn, uid, mint))

    def _client(
        self,
        namespace: str,
        seat_holder: str,
        service_account: str | None,
        pod_name: str | None,
        *,
        fallback: bool = False,
    ) -> LicenseManagerClient:
        """The holder's identity; with ``fallback`` (extend, check in) the operator's own once the
        pod is gone and its session is no longer cached (then, without License Manager rights of
        its own, the lease lapses at its expiration: never later than AWS would return it)."""
        if seat_holder == CLUSTER_HOLDER or service_account is None:
            return self.factory.default()
        try:
            return self._pod_client(namespace, service_account, seat_holder, pod_name)
        except _PodGone:
            if not fallback:
                raise PodGoneError(seat_holder) from None
            return self.factory.default()

    # -- checkout --------------------------------------------------------------------------

    def checkout(
        self,
        *,
        namespace: str,
        product: str,
        product_uid: str,
        product_code: str,
        source: LicenseManagerSource,
        issuer_key: RSAPublicKey | None,
        holder: str,
        count: int,
        pod_name: str = "",
        service_account: str | None = None,
    ) -> HeldSeat:
        """Check out what ``holder`` needs, verify it, record it; the seat as recorded.

        Raises SeatsExhausted, LicenseRefused, MeteringError, RegistrationSetupError,
        LicenseTokenError, ApiException."""
        cluster = holder == CLUSTER_HOLDER
        wanted = needed(source, cluster)
        # NodeId and ClientToken name the holder: the pod uid, or the product's uid for its
        # per-cluster checkout (unique in the account, unlike "cluster").
        node = f"cluster-{product_uid}" if cluster else holder
        labels = (namespace, product, product_code, "CheckoutLicense")
        client = self._client(namespace, holder, service_account, pod_name or None)
        try:
            with self._returned_lock:
                number = max(count, self._returned.pop(holder, 0) + 1)
            for _ in range(2):
                try:
                    result = client.checkout_license(self._request(source, wanted, cluster, node, number))
                except aws_errors.MeteringError as exc:
                    if exc.code == "NoEntitlementsAllowedException":
                        try:
                            refusal = self._judge(client, source, wanted, cluster)
                        except aws_errors.MeteringError as unknown:
                            # Without the license's view the refusal cannot be classified: neither
                            # a denial nor a grant, retried like the failed call itself.
                            raise aws_errors.MeteringError(
                                unknown.code,
                                f"CheckoutLicense answered NoEntitlementsAllowed and {unknown.operation} "
                                f"failed ({unknown.message}): no seat free, or not entitled?",
                                unknown.operation,
                                unknown.category,
                            ) from None
                        metrics.LICENSE_CALLS.labels(
                            *labels, "exhausted" if refusal.exhausted else "denied"
                        ).inc()
                        if refusal.exhausted:
                            raise SeatsExhausted(refusal.reason) from None
                        raise LicenseRefused(refusal.reason) from None
                    metrics.LICENSE_CALLS.labels(*labels, "retried" if exc.retryable else "error").inc()
                    raise
                now = self.clock.now()
                if result.expiration is not None and result.expiration <= now:
                    # A replay of checkout ``number`` whose lease has lapsed (an operator that died
                    # between the call and its record, for longer than the lease): the next number.
                    number += 1
                    continue
                break
            else:
                raise LicenseTokenError("Expired", "License Manager answered with an expired checkout twice")
            try:
                verified = verify_license_token(
                    result.signed_token or "",
                    issuer_key,
                    self._expectation(source, wanted, cluster, node, result),
                    now=self.clock.now(),
                )
            except LicenseTokenError:
                metrics.LICENSE_CALLS.labels(*labels, "error").inc()
                self._return(client, result, holder, number, (namespace, product, product_code))
                raise
            seat = HeldSeat(
                holder=holder,
                count=number,
                lease=SeatLease(
                    holder,
                    result.license_consumption_token,
                    CheckoutType[result.checkout_type.name] if result.checkout_type else source.checkout_type,
                    verified.expiration or result.expiration,
                ),
                signed=verified.token,
                issued_at=verified.issued_at,
                license_arn=verified.license_arn,
                pod=pod_name,
                service_account=service_account,
            )
            try:
                self.records.put(namespace, product, seat)
            except ApiException:
                metrics.LICENSE_CALLS.labels(*labels, "error").inc()
                self._return(client, result, holder, number, (namespace, product, product_code))
                raise
            metrics.LICENSE_CALLS.labels(*labels, "granted").inc()
            return seat
        finally:
            if client is not self.factory.default():
                client.close()

    def _request(
        self,
        source: LicenseManagerSource,
        wanted: list[LicenseEntitlement],
        cluster: bool,
        holder: str,
        number: int,
    ) -> CheckoutLicenseRequest:
        return CheckoutLicenseRequest(
            product_sku=source.product_sku,
            checkout_type=AwsCheckoutType[source.checkout_type.name],
            key_fingerprint=source.key_fingerprint,
            entitlements=tuple(
                EntitlementData(
                    name=e.name,
                    unit=e.unit,
                    value=None if e.unit == "None" else str(_amount(e, cluster)),
                )
                for e in wanted
            ),
            client_token=client_token(holder, number),
            node_id=holder,
        )

    def _expectation(
        self,
        source: LicenseManagerSource,
        wanted: list[LicenseEntitlement],
        cluster: bool,
        holder: str,
        result: CheckoutLicenseResult,
    ) -> CheckoutExpectation:
        return CheckoutExpectation(
            key_fingerprint=source.key_fingerprint,
            product_sku=source.product_sku,
            license_consumption_token=result.license_consumption_token,
            entitlements=[
                RequiredEntitlement(
                    e.name, e.unit, None if e.unit == "None" else Decimal(_amount(e, cluster))
                )
                for e in wanted
            ],
            license_arn=result.license_arn,
            node_id=holder,
        )

    def _judge(
        self,
        client: LicenseManagerClient,
        source: LicenseManagerSource,
        wanted: list[LicenseEntitlement],
        cluster: bool,
    ) -> Refusal:
        """NoEntitlementsAllowed: no seat free now, or not entitled? Ask ListReceivedLicenses."""
        answer = client.list_received_licenses(
            ListReceivedLicensesRequest(
                filters=(
                    Filter(name="ProductSKU", values=(source.product_sku,)),
                    Filter(name="Fingerprint", values=(source.key_fingerprint,)),
                )
            )
        )
        offered = [
            OfferedLicense(
                license_arn=lic.license_arn or "",
                status=lic.status or "",
                entitlements=tuple(
                    OfferedEntitlement(e.name, e.unit, e.max_count, bool(e.overage)) for e in lic.entitlements
                ),
                begin=lic.validity.begin if lic.validity else None,
                end=lic.validity.end if lic.validity else None,
            )
            for lic in answer.licenses
        ]
        needs = [NeededEntitlement(e.name, e.unit, _amount(e, cluster)) for e in wanted]
        return judge_refusal(offered, needs, self.clock.now())

    def _return(
        self,
        client: LicenseManagerClient,
        result: CheckoutLicenseResult,
        holder: str,
        number: int,
        labels: tuple[str, str, str],
    ) -> None:
        """Best effort: a checkout the gate will not use goes back at once (else at its expiry).

        A PERPETUAL checkout cannot go back (AWS answers ConflictException): its quantity is
        consumed, so it is kept for the retry, which asks with the same ClientToken and gets the
        same checkout again instead of consuming a second one."""
        token = result.license_consumption_token
        if result.checkout_type is AwsCheckoutType.PERPETUAL:
            log.warning("perpetual checkout %s is kept for the next attempt (it cannot be checked in)", token)
            return
        try:
            client.check_in_license(CheckInLicenseRequest(license_consumption_token=token))
        except aws_errors.MeteringError as exc:
            # Still live at AWS: a replay of it (same ClientToken) holds no second seat.
            log.warning("checkout %s not checked in (%s); it lapses at its expiration", token, exc.code)
            return
        metrics.LICENSE_CALLS.labels(*labels, "CheckInLicense", "checked_in").inc()
        with self._returned_lock:
            self._returned[holder] = max(number, self._returned.get(holder, 0))

    # -- extend / check in -----------------------------------------------------------------

    def extend(self, namespace: str, product: str, product_code: str, seat: HeldSeat) -> HeldSeat:
        """ExtendLicenseConsumption, then the record; the seat with its new expiration.

        Raises MeteringError (GONE: the lease lapsed or was checked in), ApiException, ..."""
        assert seat.lease is not None
        labels = (namespace, product, product_code, "ExtendLicenseConsumption")
        client = self._client(namespace, seat.holder, seat.service_account, seat.pod or None, fallback=True)
        try:
            result = client.extend_license_consumption(
                ExtendLicenseConsumptionRequest(license_consumption_token=seat.lease.token)
            )
        except aws_errors.MeteringError as exc:
            metrics.LICENSE_CALLS.labels(*labels, _outcome(exc)).inc()
            raise
        finally:
            if client is not self.factory.default():
                client.close()
        lease = SeatLease(
            seat.holder,
            seat.lease.token,
            seat.lease.checkout_type,
            result.expiration or seat.lease.expiration,
        )
        extended = replace(seat, lease=lease)
        self.records.put(namespace, product, extended)
        metrics.LICENSE_CALLS.labels(*labels, "extended").inc()
        return extended

    def check_in(self, namespace: str, product: str, product_code: str, seat: HeldSeat) -> None:
        """CheckInLicense, then drop the record entry. A GONE answer means the seat is free already."""
        assert seat.lease is not None
        labels = (namespace, product, product_code, "CheckInLicense")
        client = self._client(namespace, seat.holder, seat.service_account, seat.pod or None, fallback=True)
        try:
            client.check_in_license(CheckInLicenseRequest(license_consumption_token=seat.lease.token))
            metrics.LICENSE_CALLS.labels(*labels, "checked_in").inc()
        except aws_errors.MeteringError as exc:
            metrics.LICENSE_CALLS.labels(*labels, _outcome(exc)).inc()
            if exc.category is not aws_errors.ErrorCategory.GONE:
                raise
        finally:
            if client is not self.factory.default():
                client.close()
        self.records.drop(namespace, product, seat.holder)

    def release_all(self, namespace: str, product: str, product_code: str) -> int:
        """The product was deleted: check in every live PROVISIONAL lease on its record now rather
        than let each hold its seat until it lapses; forget the rest (a PERPETUAL lease cannot go
        back, a lapsed one already went). Best effort, lease by lease: a lease that cannot be
        checked in lapses at its expiration. Returns how many were checked in."""
        now = self.clock.now()
        returned = 0
        for holder, seat in self.records.load(namespace, product).items():
            lease = seat.lease
            if lease is None or lease.checkout_type is CheckoutType.PERPETUAL or lease.lapsed(now):
                self.records.drop(namespace, product, holder)
                continue
            try:
                self.check_in(namespace, product, product_code, seat)
                returned += 1
            except Exception as exc:
                log.warning(
                    "lease of %s (deleted product %s/%s) not checked in: %s; it lapses at %s",
                    holder,
                    namespace,
                    product,
                    exc,
                    lease.expiration,
                )
        return returned

    def forget(self, namespace: str, product: str, holder: str) -> None:
        self.records.drop(namespace, product, holder)

    def load(self, namespace: str, product: str) -> dict[str, HeldSeat]:
        return self.records.load(namespace, product)


def _outcome(exc: aws_errors.MeteringError) -> str:
    if exc.category is aws_errors.ErrorCategory.GONE:
        return "gone"
    return "retried" if exc.retryable else "error"


__all__ = [
    "LicenseRefused",
    "Licensing",
    "SeatsExhausted",
    "needed",
]
