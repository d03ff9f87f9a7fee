"""Seller pins: what a product must be, decided by the seller, whatever its MeteredProduct says.

The seller ships the chart (and so the operator's flags); the buyer edits MeteredProducts. A pin,
per product code, names the one MeteredProduct (``namespace/name``) that may carry the code and
the least it must be: the minimum entitlement mode (Enforce > Audit > Off), the scope, the
dimensions it meters, the public key (with its version) that verifies RegisterUsage,
optionally the selector of its pods and, optionally, the least ``metering.onFailure`` policy (a
minimum action, Report < HoldNewPods < Evict, and a maximum ``afterHours``).

:func:`resolve` turns a MeteredProduct's spec into the *effective* spec the gate and metering act
on. Where the spec is weaker than its pin it is not obeyed -- the pin wins field by field -- and
every such field is a :class:`Violation` to report. A MeteredProduct elsewhere that uses a pinned
product code is not obeyed at all (a :class:`Resolution` with a ``refusal``): that is how a decoy
product with the same code never takes over the pinned one. Without pins nothing changes: the
spec is obeyed as written (and so every buyer edit is trusted).

Pure: no I/O, no clock. The operator parses pins from ``--pin`` / ``--pins-file`` (the chart's
``pins:`` values) with :class:`Pins`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

from metering_operator.domain.conditions import ConditionSpec
from metering_operator.domain.product import (
    DNS_SUBDOMAIN_PATTERN,
    MAX_DIMENSIONS,
    MAX_FAILURE_HOURS,
    PEM_MAX_LENGTH,
    PEM_PATTERN,
    PRODUCT_CODE_MAX_LENGTH,
    PRODUCT_CODE_PATTERN,
    Dimension,
    EntitlementMode,
    EntitlementScope,
    EntitlementSource,
    FailureAction,
    LabelSelector,
    MeteredProduct,
    MeteredProductSpec,
    OnFailure,
    PublicKeySource,
)
from metering_operator.domain.selectors import to_query
from metering_operator.domain.signature import SignatureError, load_public_key

#: Namespace names are DNS labels.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

#: Enforce > Audit > Off: how much each mode protects the seller.
MODE_STRENGTH: dict[EntitlementMode, int] = {
    EntitlementMode.OFF: 0,
    EntitlementMode.AUDIT: 1,
    EntitlementMode.ENFORCE: 2,
}

#: Report < HoldNewPods < Evict: how much each onFailure action protects the seller.
ACTION_STRENGTH: dict[FailureAction, int] = {
    FailureAction.REPORT: 0,
    FailureAction.HOLD_NEW_PODS: 1,
    FailureAction.EVICT: 2,
}

#: A pin's onFailure that needs Enforce, refused without a pinned minMode Enforce.
PIN_ON_FAILURE_MODE_MESSAGE = (
    "onFailure.minAction {action} needs minMode Enforce: HoldNewPods and Evict act through the "
    "scheduling gate, which only Enforce uses, and a pinned minMode {mode} lets the buyer set "
    "entitlement.mode {mode}"
)

#: Ready reasons (the field is named in the message).
REASON_VIOLATED = "PinViolated"
REASON_ELSEWHERE = "PinnedElsewhere"


class _PinModel(BaseModel):
    """The chart's values as written (camelCase), nothing unknown, immutable once read."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="forbid",
        frozen=True,
    )


class PinnedOnFailure(_PinModel):
    """The least ``spec.metering.onFailure`` a pinned product has: the buyer may only make it stricter.

    The defaults pin nothing: ``minAction: Report`` is every action, ``maxAfterHours: 24`` every
    threshold the CRD accepts.
    """

    min_action: FailureAction = FailureAction.REPORT
    max_after_hours: int = Field(default=MAX_FAILURE_HOURS, strict=True, ge=1, le=MAX_FAILURE_HOURS)


class Pin(_PinModel):
    """What the seller pins for one product code."""

    product_code: str = Field(min_length=1, max_length=PRODUCT_CODE_MAX_LENGTH, pattern=PRODUCT_CODE_PATTERN)
    namespace: str = Field(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)
    min_mode: EntitlementMode = EntitlementMode.ENFORCE
    scope: EntitlementScope = EntitlementScope.POD
    dimensions: tuple[Dimension, ...] = Field(default=(), max_length=MAX_DIMENSIONS)
    public_key: str | None = Field(default=None, min_length=1, max_length=PEM_MAX_LENGTH, pattern=PEM_PATTERN)
    public_key_version: int | None = Field(default=None, strict=True, ge=1, le=2**31 - 1)
    #: The product's pods; None: the MeteredProduct's own selector is obeyed.
    selector: LabelSelector | None = None
    #: The least onFailure policy; None: the MeteredProduct's own onFailure is obeyed.
    on_failure: PinnedOnFailure | None = None

    @field_validator("public_key")
    @classmethod
    def _rsa_key(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                load_public_key(value)
            except SignatureError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.public_key is None) != (self.public_key_version is None):
            raise ValueError("publicKey and publicKeyVersion are pinned together (both or neither)")
        if self.min_mode is not EntitlementMode.OFF and self.public_key is None:
            raise ValueError(
                f"minMode {self.min_mode.value} needs publicKey and publicKeyVersion: entitlement "
                "is verified with the pinned key"
            )
        names = [d.name for d in self.dimensions]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate dimension names: {', '.join(dups)}")
        if (
            self.on_failure is not None
            and self.on_failure.min_action is not FailureAction.REPORT
            and self.min_mode is not EntitlementMode.ENFORCE
        ):
            # Otherwise the effective spec could be Audit with HoldNewPods, which no spec may be.
            raise ValueError(
                PIN_ON_FAILURE_MODE_MESSAGE.format(
                    action=self.on_failure.min_action.value, mode=self.min_mode.value
                )
            )
        return self

    @property
    def key(self) -> str:
        """``namespace/name`` of the pinned MeteredProduct."""
        return f"{self.namespace}/{self.name}"


class Pins(BaseModel):
    """All pins of one operator: at most one per product code and per MeteredProduct."""

    model_config = ConfigDict(frozen=True)

    pins: tuple[Pin, ...] = ()

    @model_validator(mode="after")
    def _unique(self) -> Self:
        codes = [p.product_code for p in self.pins]
        keys = [p.key for p in self.pins]
        for what, values in (("product code", codes), ("MeteredProduct", keys)):
            dups = sorted({v for v in values if values.count(v) > 1})
            if dups:
                raise ValueError(f"more than one pin for {what} {', '.join(dups)}")
        return self

    @classmethod
    def parse(cls, items: list[Any]) -> Pins:
        """Pins from a list of mappings (the ``pins:`` values, ``--pin`` JSON objects)."""
        return cls.model_validate({"pins": items})

    def __bool__(self) -> bool:
        return bool(self.pins)

    def for_code(self, product_code: str) -> Pin | None:
        return next((p for p in self.pins if p.product_code == product_code), None)

    def at(self, namespace: str, name: str) -> Pin | None:
        return next((p for p in self.pins if (p.namespace, p.name) == (namespace, name)), None)

    @property
    def namespaces(self) -> frozenset[str]:
        return frozenset(p.namespace for p in self.pins)


@dataclass(frozen=True)
class Violation:
    """One field where a MeteredProduct is weaker than (or differs from) its pin."""

    field: str
    message: str


@dataclass(frozen=True)
class Resolution:
    """A MeteredProduct as the operator obeys it."""

    #: The effective spec: the MeteredProduct's, with the pin applied where it is weaker.
    spec: MeteredProductSpec
    pin: Pin | None = None
    violations: tuple[Violation, ...] = ()
    #: Set when the MeteredProduct is not obeyed at all (its product code is pinned elsewhere).
    refusal: str | None = None

    @property
    def obeyed(self) -> bool:
        return self.refusal is None

    def ready(self) -> ConditionSpec | None:
        """``Ready=False`` for a refusal or a violation; None when the pin (if any) is met."""
        if self.refusal is not None:
            return ConditionSpec("Ready", "False", REASON_ELSEWHERE, self.refusal)
        if self.violations:
            return ConditionSpec(
                "Ready",
                "False",
                REASON_VIOLATED,
                "; ".join(v.message for v in self.violations)
                + ". The seller's pin is obeyed instead of these fields.",
            )
        return None


def resolve(pins: Pins, namespace: str, name: str, spec: MeteredProductSpec) -> Resolution:
    """The effective spec of MeteredProduct ``namespace/name`` under ``pins``."""
    pin = pins.at(namespace, name)
    if pin is None:
        elsewhere = pins.for_code(spec.product_code)
        if elsewhere is None:
            return Resolution(spec)
        return Resolution(
            spec,
            pin=elsewhere,
            refusal=f"product code {spec.product_code} is pinned to MeteredProduct {elsewhere.key}; "
            f"this MeteredProduct ({namespace}/{name}) is not obeyed: its pods are neither gated nor "
            "registered, nor is it metered",
        )
    return _apply(pin, spec)


def effective(pins: Pins, product: MeteredProduct) -> MeteredProduct:
    """``product`` with its effective spec (see :func:`resolve`)."""
    if not pins:
        return product
    resolution = resolve(pins, product.metadata.namespace or "", product.metadata.name, product.spec)
    return product.model_copy(update={"spec": resolution.spec})


def _apply(pin: Pin, spec: MeteredProductSpec) -> Resolution:
    violations: list[Violation] = []

    def violated(field: str, message: str) -> None:
        violations.append(Violation(field, message))

    if spec.product_code != pin.product_code:
        violated("spec.productCode", f"spec.productCode is {spec.product_code}, pinned {pin.product_code}")
    mode = spec.entitlement.mode
    if MODE_STRENGTH[mode] < MODE_STRENGTH[pin.min_mode]:
        violated(
            "spec.entitlement.mode",
            f"spec.entitlement.mode is {mode.value}, pinned minimum {pin.min_mode.value}",
        )
        mode = pin.min_mode
    if spec.entitlement.scope is not pin.scope:
        violated(
            "spec.entitlement.scope",
            f"spec.entitlement.scope is {spec.entitlement.scope.value}, pinned {pin.scope.value}",
        )
    public_key, version = spec.public_key, spec.public_key_version
    if pin.public_key is not None and pin.public_key_version is not None:
        if spec.public_key_version != pin.public_key_version:
            violated(
                "spec.publicKeyVersion",
                f"spec.publicKeyVersion is {spec.public_key_version}, pinned {pin.public_key_version}",
            )
        # An inline key is compared; a configMapKeyRef is not read here (it is simply not used).
        inline = spec.public_key.pem if spec.public_key is not None else None
        if inline is not None and _pem_body(inline) != _pem_body(pin.public_key):
            violated("spec.publicKey", "spec.publicKey is not the pinned public key")
        public_key = PublicKeySource(pem=pin.public_key)
        version = pin.public_key_version
    entitlement = spec.entitlement.model_copy(update={"mode": mode, "scope": pin.scope})
    if public_key is not None and spec.entitlement.source is not EntitlementSource.REGISTER_USAGE:
        # A pinned key verifies RegisterUsage: the pinned product is entitled that way, whatever
        # source the spec names (a License Manager spec carries no RegisterUsage key at all).
        violated(
            "spec.entitlement.source",
            f"spec.entitlement.source is {spec.entitlement.source.value}, pinned RegisterUsage",
        )
        entitlement = entitlement.model_copy(
            update={"source": EntitlementSource.REGISTER_USAGE, "license_manager": None}
        )
    selector = spec.selector
    if pin.selector is not None and spec.selector != pin.selector:
        violated(
            "spec.selector",
            f"spec.selector is {to_query(spec.selector) or '(every pod)'}, pinned {to_query(pin.selector)}",
        )
        selector = pin.selector
    dimensions = _dimensions(pin, list(spec.metering.dimensions), violated)
    if spec.metering.dry_run:
        violated("spec.metering.dryRun", "spec.metering.dryRun is true, a pinned product is never dry-run")
    on_failure = spec.metering.on_failure
    if pin.on_failure is not None:
        on_failure = _on_failure(pin.on_failure, on_failure, violated)
    effective = spec.model_copy(
        update={
            "product_code": pin.product_code,
            "public_key_version": version,
            "public_key": public_key,
            "entitlement": entitlement,
            "selector": selector,
            "metering": spec.metering.model_copy(
                update={"dimensions": dimensions, "dry_run": False, "on_failure": on_failure}
            ),
        }
    )
    # Validated again as a whole: the effective spec obeys the same rules as any spec.
    effective = MeteredProductSpec.model_validate(effective.to_kube())
    return Resolution(effective, pin=pin, violations=tuple(violations))


def _dimensions(pin: Pin, dims: list[Dimension], violated: Any) -> list[Dimension]:
    """The buyer's dimensions with every pinned one present exactly as pinned (extras are kept:
    they only add usage)."""
    pinned = {d.name: d for d in pin.dimensions}
    result: list[Dimension] = []
    for dim in dims:
        want = pinned.pop(dim.name, None)
        if want is not None and want != dim:
            violated(
                "spec.metering.dimensions",
                f"spec.metering.dimensions {dim.name} is {_describe(dim)}, pinned {_describe(want)}",
            )
            dim = want
        result.append(dim)
    if pinned:
        violated(
            "spec.metering.dimensions",
            f"spec.metering.dimensions lacks pinned dimension(s) {', '.join(pinned)}",
        )
        result.extend(pinned.values())
    return result


def _on_failure(pin: PinnedOnFailure, spec: OnFailure, violated: Any) -> OnFailure:
    """The stricter of pin and spec, field by field: the stronger action, the fewer hours.

    A spec without ``onFailure`` carries its defaults (Report after 3 hours; the API server writes
    them too), so against a stricter pin it is a violation like any other weaker value.
    """
    action, hours = spec.action, spec.after_hours
    if ACTION_STRENGTH[action] < ACTION_STRENGTH[pin.min_action]:
        violated(
            "spec.metering.onFailure.action",
            f"spec.metering.onFailure.action is {action.value}, pinned minimum {pin.min_action.value}",
        )
        action = pin.min_action
    if hours > pin.max_after_hours:
        violated(
            "spec.metering.onFailure.afterHours",
            f"spec.metering.onFailure.afterHours is {hours}, pinned maximum {pin.max_after_hours}",
        )
        hours = pin.max_after_hours
    return OnFailure(action=action, after_hours=hours)


def _describe(dim: Dimension) -> str:
    text = f"{dim.source.value}/{dim.aggregation.value}/{dim.rounding.value}"
    if dim.allocations is not None:
        text += " with allocations " + ",".join(t.key for t in dim.allocations.tags)
    return text


def _pem_body(pem: str) -> str:
    return "".join(pem.split())
