"""The ``Ready`` condition: does the product work as configured?

``Ready`` is the one-word answer a seller or buyer reads in ``kubectl get meteredproducts``. It
summarises *configuration*, not weather: it turns False only for faults someone has to fix in
the spec, the listing or the operator's flags, and never for a transient outage (a throttled or
failing AWS call is retried and shows on ``Entitled`` / ``Metering`` with its reason instead).
The rule, first match wins:

1. the spec does not parse                      -> False ``InvalidSpec``
2. the product code is not trusted               -> False ``UntrustedProductCode``
   the product code is pinned to another MeteredProduct
                                                 -> False ``PinnedElsewhere``
   the spec is weaker than the seller's pin (the pin is obeyed instead)
                                                 -> False ``PinViolated``, naming the fields
                                                    (:mod:`metering_operator.domain.pins`)
3. entitlement needs the public key, and it does not load
                                                 -> False ``PublicKeyUnavailable``
4. the product meters (has dimensions) and its ``Metering`` condition is False for a reason
   that resending can never fix (:data:`REJECTING_METERING_REASONS`: AWS refused a dimension,
   or another MeteredProduct already meters the same code)
                                                 -> False with the Metering reason and message
5. entitlement is on, pods were seen, and AWS denied every one of them (the buyer is not
   entitled: a final answer someone has to fix in the subscription or the listing)
                                                 -> False ``AllPodsDenied``
6. otherwise                                     -> True ``Configured``

``SendFailing`` (MeterUsage failing, retried inside the 6-hour window) deliberately keeps Ready
True: the configuration is fine and no hour is lost. A product with entitlement ``Off`` is judged
on rules 1, 2 and 4; one without dimensions on 1 to 3. The True message does not repeat the
Metering message (that moves every hour), so Ready is rewritten only when its verdict changes.

One writer owns ``Ready``: the entitlement gate's status writer, which runs for every product;
the metering side owns ``Metering`` and never touches ``Ready``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from metering_operator.domain.conditions import ConditionSpec

READY = "Ready"
#: Metering reasons that mean "the product, as configured, cannot be metered".
REJECTING_METERING_REASONS = frozenset({"DimensionRejected", "DuplicateProductCode"})


def ready_condition(
    *,
    spec_error: str | None = None,
    trusted: bool = True,
    pinned: ConditionSpec | None = None,
    product_code: str = "",
    key_error: str | None = None,
    meters: bool = False,
    metering: Mapping[str, Any] | None = None,
    denied_pods: int = 0,
    other_pods: int = 0,
) -> ConditionSpec:
    """Ready from the spec's usability and, for a metered product, its Metering condition.

    ``key_error`` is the reason the public key does not load, or None when it loads or
    entitlement does not need it (mode Off). ``metering`` is the product's current Metering
    condition (None when absent). ``pinned`` is the pins' verdict
    (:meth:`metering_operator.domain.pins.Resolution.ready`), None when the pin is met or absent.
    ``denied_pods`` / ``other_pods``: the product's pods AWS denied, and those registered or still
    pending.
    """
    if spec_error is not None:
        return ConditionSpec(READY, "False", "InvalidSpec", spec_error)
    if not trusted:
        return ConditionSpec(
            READY,
            "False",
            "UntrustedProductCode",
            f"product code {product_code!r} is not in the operator's trusted product codes; "
            "its pods are neither gated nor registered, nor is it metered",
        )
    if pinned is not None:
        return pinned
    if key_error:
        return ConditionSpec(READY, "False", "PublicKeyUnavailable", key_error)
    if meters and metering is not None and metering_rejects(metering):
        return ConditionSpec(
            READY, "False", str(metering["reason"]), str(metering.get("message") or metering["reason"])
        )
    if denied_pods and not other_pods:
        return ConditionSpec(
            READY,
            "False",
            "AllPodsDenied",
            f"AWS Marketplace denied all {denied_pods} pod(s) of the product: they stay gated; "
            "see the Entitled condition and the pods' Events",
        )
    what = "product is trusted and its configuration loads"
    if meters:
        what += "; no dimension is refused"
    return ConditionSpec(READY, "True", "Configured", what)


def metering_rejects(metering: Mapping[str, Any]) -> bool:
    """Whether a Metering condition says the product, as configured, cannot be metered."""
    return metering.get("status") == "False" and metering.get("reason") in REJECTING_METERING_REASONS
