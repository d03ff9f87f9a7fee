"""A MeteredProduct as metering sees it, and which product meters a product code."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from metering_operator.domain import ledger
from metering_operator.domain.aggregation import Aggregation, Rounding
from metering_operator.domain.pins import Pins, effective
from metering_operator.domain.product import GROUP, VERSION, MeteredProduct
from metering_operator.domain.sampling import Source, TagRule


@dataclass
class ProductPlan:
    """What one cycle needs from the spec."""

    product: MeteredProduct
    rules: list[ledger.DimensionRule]
    sources: dict[str, Source]
    tags: dict[str, list[TagRule]]

    @classmethod
    def of(cls, product: MeteredProduct) -> ProductPlan:
        dims = product.spec.metering.dimensions
        return cls(
            product=product,
            rules=[
                ledger.DimensionRule(d.name, Aggregation(d.aggregation), Rounding(d.rounding)) for d in dims
            ],
            sources={d.name: Source(d.source) for d in dims},
            tags={
                d.name: [TagRule(t.key, t.from_label) for t in d.allocations.tags] if d.allocations else []
                for d in dims
            },
        )

    @property
    def dry_run(self) -> bool:
        return self.product.spec.metering.dry_run

    @property
    def product_code(self) -> str:
        return self.product.spec.product_code

    @property
    def key(self) -> str:
        return f"{self.product.metadata.namespace}/{self.product.metadata.name}"

    def rule(self, dimension: str) -> ledger.DimensionRule | None:
        return next((r for r in self.rules if r.name == dimension), None)

    def ref(self) -> dict[str, str]:
        meta = self.product.metadata
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "name": meta.name,
            "namespace": meta.namespace or "",
            "uid": meta.uid or "",
        }


def product_as_metered(pins: Pins, obj: Mapping[str, Any]) -> MeteredProduct:
    """The seam: the product as metering obeys it (the seller's pins applied)."""
    return effective(pins, MeteredProduct.from_kube(dict(obj)))


def has_live_entries(status: Mapping[str, Any] | None) -> bool:
    """Whether a raw status still holds Pending or Unknown ledger entries (dimensions removed or not)."""
    entries = ((status or {}).get("metering") or {}).get("ledger") or []
    live = {state.value for state in ledger.LIVE}
    return any(isinstance(e, Mapping) and e.get("state", "Pending") in live for e in entries)


def metering_owners(
    products: Sequence[Mapping[str, Any]], pins: Pins | None = None
) -> dict[str, tuple[str, str]]:
    """Product code -> (namespace, name) of the MeteredProduct that meters it: the pinned one for a
    pinned code (whatever exists, however old), otherwise the oldest with dimensions using it.

    AWS keeps one record per product code, caller, dimension and hour: a second product with the
    same code would collide with the first (DuplicateRequest, or worse an identical quantity
    answered with the first one's record). Until usage of such products is merged, only the
    oldest meters and the others say why.
    """
    pinned = {p.product_code: (p.namespace, p.name) for p in (pins.pins if pins else ())}
    candidates: dict[str, tuple[str, str, str]] = {}
    for item in products:
        meta = item.get("metadata") or {}
        spec = item.get("spec") or {}
        if meta.get("deletionTimestamp") or not (spec.get("metering") or {}).get("dimensions"):
            continue
        code = str(spec.get("productCode") or "")
        key = (
            str(meta.get("creationTimestamp") or ""),
            str(meta.get("namespace") or ""),
            str(meta.get("name")),
        )
        if code and (code not in candidates or key < candidates[code]):
            candidates[code] = key
    return {code: (key[1], key[2]) for code, key in candidates.items()} | pinned
