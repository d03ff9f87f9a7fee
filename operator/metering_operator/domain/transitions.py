"""Changes to the fields that decide how much a product protects the seller, and the ``Enforced``
condition that states where it stands.

A buyer who can edit a MeteredProduct can switch ``Enforce`` to ``Audit`` or ``Off``, turn on
``dryRun``, switch scope ``Pod`` to ``Cluster``, narrow the selector, remove dimensions, soften
``metering.onFailure`` (a weaker action, more hours) or (without the CRD's transition rule) change
the product code. Each such change must leave a record, pinned
or not: :func:`changes` lists them (old value, new value, whether it weakens), each becomes an
Event, and :func:`enforced_condition` moves the ``Enforced`` condition.

The operator remembers what it last saw in ``status.observedSpec`` (:class:`ObservedSpec`), which
only the operator can write (status subresource): a change made while the operator was down is
reported when it starts, and no annotation a buyer can edit takes part.

:func:`immutable_changes` mirrors the CRD's CEL transition rules (``oldSelf``) for callers that
compare two specs themselves; the API server is what enforces them.
"""

from __future__ import annotations

from dataclasses import dataclass

from metering_operator.domain.conditions import ConditionSpec
from metering_operator.domain.pins import ACTION_STRENGTH, MODE_STRENGTH
from metering_operator.domain.product import (
    PRODUCT_CODE_IMMUTABLE,
    EntitlementMode,
    EntitlementScope,
    MeteredProductSpec,
    ObservedSpec,
)
from metering_operator.domain.selectors import to_query

ENFORCED = "Enforced"


def observe(spec: MeteredProductSpec) -> ObservedSpec:
    """The protection-relevant fields of ``spec``."""
    return ObservedSpec(
        product_code=spec.product_code,
        mode=spec.entitlement.mode,
        scope=spec.entitlement.scope,
        dry_run=spec.metering.dry_run,
        dimensions=sorted(d.name for d in spec.metering.dimensions),
        selector=to_query(spec.selector),
        on_failure_action=spec.metering.on_failure.action,
        on_failure_after_hours=spec.metering.on_failure.after_hours,
    )


@dataclass(frozen=True)
class Change:
    """One field that changed between two observations."""

    field: str
    old: str
    new: str
    weakens: bool
    reason: str

    @property
    def message(self) -> str:
        return f"{self.field} changed from {self.old} to {self.new}"


def changes(old: ObservedSpec | None, new: ObservedSpec) -> list[Change]:
    """What changed from ``old`` to ``new`` (nothing when there is no ``old`` to compare with)."""
    if old is None:
        return []
    found: list[Change] = []
    if old.product_code != new.product_code:
        found.append(
            Change("spec.productCode", old.product_code, new.product_code, True, "ProductCodeChanged")
        )
    if old.mode is not new.mode:
        found.append(
            Change(
                "spec.entitlement.mode",
                old.mode.value,
                new.mode.value,
                MODE_STRENGTH[new.mode] < MODE_STRENGTH[old.mode],
                "EntitlementModeChanged",
            )
        )
    if old.scope is not new.scope:
        found.append(
            Change(
                "spec.entitlement.scope",
                old.scope.value,
                new.scope.value,
                new.scope is EntitlementScope.CLUSTER,
                "EntitlementScopeChanged",
            )
        )
    if old.dry_run != new.dry_run:
        found.append(
            Change(
                "spec.metering.dryRun",
                str(old.dry_run).lower(),
                str(new.dry_run).lower(),
                new.dry_run,
                "DryRunChanged",
            )
        )
    removed = sorted(set(old.dimensions) - set(new.dimensions))
    added = sorted(set(new.dimensions) - set(old.dimensions))
    if removed or added:
        found.append(
            Change(
                "spec.metering.dimensions",
                ",".join(old.dimensions) or "(none)",
                ",".join(new.dimensions) or "(none)",
                bool(removed),
                "DimensionsChanged",
            )
        )
    # None: recorded before selectors were observed, so no change can be told.
    if old.selector is not None and new.selector is not None and old.selector != new.selector:
        # Whether a new selector takes pods away cannot be judged from the strings: a Warning.
        found.append(
            Change(
                "spec.selector",
                old.selector or "(every pod)",
                new.selector or "(every pod)",
                True,
                "SelectorChanged",
            )
        )
    on_failure = _on_failure_change(old, new)
    if on_failure is not None:
        found.append(on_failure)
    return found


def _on_failure_change(old: ObservedSpec, new: ObservedSpec) -> Change | None:
    """``onFailure`` as one field: a weaker action or more hours weakens (a Warning)."""
    # None: recorded before onFailure was observed, so no change can be told.
    if old.on_failure_action is None or new.on_failure_action is None:
        return None
    if old.on_failure_action is new.on_failure_action and (
        old.on_failure_after_hours == new.on_failure_after_hours
    ):
        return None
    weakens = ACTION_STRENGTH[new.on_failure_action] < ACTION_STRENGTH[old.on_failure_action] or (
        (new.on_failure_after_hours or 0) > (old.on_failure_after_hours or 0)
    )
    return Change(
        "spec.metering.onFailure",
        f"{old.on_failure_action.value} after {old.on_failure_after_hours}h",
        f"{new.on_failure_action.value} after {new.on_failure_after_hours}h",
        weakens,
        "OnFailureChanged",
    )


def enforced_condition(spec: MeteredProductSpec, *, obeyed: bool = True) -> ConditionSpec:
    """``Enforced``: True only when the product is gated per pod and billed for real.

    Judged on the *effective* spec (what the operator does, pins applied). The reason lists every
    way the product is weaker, so each weakening moves the condition: ``EntitlementAudit`` or
    ``EntitlementOff``, ``ClusterScope``, ``DryRun`` (comma-separated, in that order).
    """
    summary = (
        f"product code {spec.product_code}, entitlement {spec.entitlement.mode.value} "
        f"(scope {spec.entitlement.scope.value}), metering "
        + ("dry-run" if spec.metering.dry_run else "billed")
        + f" ({len(spec.metering.dimensions)} dimension(s))"
    )
    if not obeyed:
        return ConditionSpec(ENFORCED, "False", "NotObeyed", f"not obeyed: {summary}")
    weaker: list[str] = []
    if spec.entitlement.mode is EntitlementMode.AUDIT:
        weaker.append("EntitlementAudit")
    elif spec.entitlement.mode is EntitlementMode.OFF:
        weaker.append("EntitlementOff")
    if (
        spec.entitlement.scope is EntitlementScope.CLUSTER
        and spec.entitlement.mode is not EntitlementMode.OFF
    ):
        weaker.append("ClusterScope")
    if spec.metering.dry_run and spec.metering.dimensions:
        weaker.append("DryRun")
    if not weaker:
        return ConditionSpec(ENFORCED, "True", "Enforced", summary)
    return ConditionSpec(ENFORCED, "False", ",".join(weaker), summary)


def immutable_changes(old: MeteredProductSpec, new: MeteredProductSpec) -> list[str]:
    """The CRD's transition rules, as messages (the API server refuses such an update)."""
    if old.product_code != new.product_code:
        return [PRODUCT_CODE_IMMUTABLE]
    return []
