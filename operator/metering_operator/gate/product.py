"""The product as the gate sees it: one parsed, checked snapshot of a MeteredProduct.

Kept apart from the runtime (clients, pools) so the pure state machine
(:mod:`metering_operator.gate.machine`) depends on data only.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from metering_operator.domain.pins import Resolution
from metering_operator.domain.product import (
    API_VERSION,
    KIND,
    EntitlementMode,
    EntitlementScope,
    EntitlementSource,
    LicenseManagerSource,
    MeteredProductSpec,
)
from metering_operator.domain.selectors import to_query
from metering_operator.domain.signature import ProductKey


@dataclass(frozen=True)
class ProductInfo:
    """Spec, trust and loaded public key of one MeteredProduct generation."""

    namespace: str
    name: str
    uid: str
    generation: int
    spec: MeteredProductSpec
    trusted: bool
    public_key: RSAPublicKey | None
    key_error: str | None
    #: How the seller's pins apply (``spec`` is already the effective spec); None: not resolved.
    resolution: Resolution | None = None
    #: License Manager products: the issuer's key that verifies SignedTokens (None: not configured,
    #: the token's claims are checked but not its signature; see docs/pricing-models.md).
    issuer_key: RSAPublicKey | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def mode(self) -> EntitlementMode:
        return self.spec.entitlement.mode

    @property
    def license(self) -> LicenseManagerSource | None:
        """What to check out of License Manager (contract products), or None (RegisterUsage)."""
        entitlement = self.spec.entitlement
        if entitlement.source is EntitlementSource.LICENSE_MANAGER:
            return entitlement.license_manager
        return None

    @property
    def cluster_scope(self) -> bool:
        return self.spec.entitlement.scope is EntitlementScope.CLUSTER

    @property
    def selector(self) -> str:
        return to_query(self.spec.selector)

    @property
    def active(self) -> bool:
        """Whether pods are handled at all (trusted, obeyed, key usable, mode not Off)."""
        # A contract product needs no RegisterUsage key; its issuer key is optional but, when
        # configured, must load.
        keyed = self.key_error is None if self.license is not None else self.public_key is not None
        return self.trusted and self.obeyed and keyed and self.mode is not EntitlementMode.OFF

    @property
    def obeyed(self) -> bool:
        """False when the product's code is pinned to another MeteredProduct."""
        return self.resolution is None or self.resolution.obeyed

    def product_key(self) -> ProductKey:
        # Both are required unless mode is Off, and an Off product never registers (see active).
        assert self.public_key is not None
        assert self.spec.public_key_version is not None
        return ProductKey(self.spec.product_code, self.spec.public_key_version, self.public_key)

    def ref(self) -> dict[str, str]:
        return {
            "kind": KIND,
            "apiVersion": API_VERSION,
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
        }
