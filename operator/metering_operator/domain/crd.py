"""Generate the MeteredProduct CustomResourceDefinition from the pydantic models.

pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema: every
node typed, no ``$ref``, no ``anyOf``/``oneOf`` carrying types, no ``additionalProperties`` next to
``properties``, boolean ``exclusiveMinimum``. :func:`structural` performs that translation and
refuses anything it cannot translate faithfully (rather than silently loosening validation), and
insists that every property has a description, because those descriptions are what
``kubectl explain meteredproduct.spec...`` prints.

Everything else the API server enforces (enums, patterns, lengths, defaults, CEL
``x-kubernetes-validations``, list-map keys) is written next to the fields in
:mod:`metering_operator.domain.product` and passes through unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from metering_operator.domain import product

#: JSON Schema keywords that carry no validation or documentation for the API server.
_DROPPED = frozenset({"title", "$defs", "examples"})
#: Keywords whose values are schemas, handled recursively.
_SCHEMA_VALUED = frozenset({"properties", "items", "additionalProperties"})
#: Keywords kept as they are.
_KEPT = frozenset(
    {
        "type",
        "description",
        "default",
        "enum",
        "format",
        "pattern",
        "minLength",
        "maxLength",
        "minimum",
        "maximum",
        "minItems",
        "maxItems",
        "minProperties",
        "maxProperties",
        "required",
        "nullable",
        "x-kubernetes-validations",
        "x-kubernetes-list-type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-map-type",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-int-or-string",
        "x-kubernetes-embedded-resource",
    }
)


class SchemaError(ValueError):
    """The models produced a schema that cannot become a structural CRD schema."""


def structural(model: type[BaseModel], *, keep_defaults: bool = True) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model``'s camelCase wire form."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs: dict[str, Any] = schema.get("$defs", {})
    return _convert(schema, defs, path=model.__name__, keep_defaults=keep_defaults)


def _resolve(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline ``$ref``/single ``allOf`` and drop the ``null`` branch of ``X | None``.

    Sibling keywords win over the referenced definition: a field's own description and default
    are more specific than the docstring of the type it uses.
    """
    node = dict(node)
    if "$ref" in node:
        name = node.pop("$ref").removeprefix("#/$defs/")
        if name not in defs:
            raise SchemaError(f"{path}: unresolvable $ref {name!r}")
        node = {**_resolve(defs[name], defs, path), **node}
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"{path}: allOf with {len(parts)} parts is not structural")
        node = {**_resolve(parts[0], defs, path), **node}
    if "anyOf" in node or "oneOf" in node:
        branches = node.pop("anyOf", None) or node.pop("oneOf")
        non_null = [b for b in branches if b != {"type": "null"}]
        if len(non_null) != 1:
            raise SchemaError(
                f"{path}: a union of {len(non_null)} types cannot be structural; "
                "use one type and a CEL rule instead"
            )
        node = {**_resolve(non_null[0], defs, path), **node}
        # Optional fields are simply absent on the wire (to_kube excludes None): no null default.
        if node.get("default", ...) is None:
            del node["default"]
    return node


def _convert(node: dict[str, Any], defs: dict[str, Any], *, path: str, keep_defaults: bool) -> dict[str, Any]:
    node = _resolve(node, defs, path)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED:
            continue
        if key == "default" and not keep_defaults:
            continue
        if key == "properties":
            out[key] = {}
            for name, sub in value.items():
                sub_path = f"{path}.{name}"
                converted = _convert(sub, defs, path=sub_path, keep_defaults=keep_defaults)
                if not converted.get("description"):
                    raise SchemaError(f"{sub_path}: every field needs a description (kubectl explain)")
                out[key][name] = converted
        elif key == "items":
            out[key] = _convert(value, defs, path=f"{path}[]", keep_defaults=keep_defaults)
        elif key == "additionalProperties":
            if value is False:
                continue  # pydantic's extra="forbid"; the API server prunes unknown fields instead
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            else:
                out[key] = _convert(value, defs, path=f"{path}{{}}", keep_defaults=keep_defaults)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # JSON Schema 2020-12 numbers -> OpenAPI v3.0 booleans beside minimum/maximum.
            bound = "minimum" if key == "exclusiveMinimum" else "maximum"
            out[bound] = value
            out[key] = True
        elif key in _KEPT:
            out[key] = copy.deepcopy(value)
        else:
            raise SchemaError(f"{path}: keyword {key!r} has no structural equivalent")
    if "type" not in out:
        raise SchemaError(f"{path}: no type (structural schemas type every node)")
    if "properties" in out and "additionalProperties" in out:
        raise SchemaError(f"{path}: properties and additionalProperties together are not structural")
    return _ordered(out)


# Reading order in the generated YAML: what a node is first, its children last.
_ORDER = ("description", "type", "format", "enum", "default")
_LAST = ("required", "properties", "additionalProperties", "items")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    head = [k for k in _ORDER if k in node]
    tail = [k for k in _LAST if k in node]
    middle = sorted(k for k in node if k not in head and k not in tail)
    return {k: node[k] for k in (*head, *middle, *tail)}


ROOT_DESCRIPTION = (
    "MeteredProduct describes a paid AWS Marketplace container product running in this namespace: "
    "which pods are the product, how they are entitled with RegisterUsage, and which custom "
    "dimensions are metered hourly with MeterUsage."
)

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Product",
        "type": "string",
        "jsonPath": ".spec.productCode",
        "description": "AWS Marketplace product code.",
    },
    {
        "name": "Mode",
        "type": "string",
        "jsonPath": ".spec.entitlement.mode",
        "description": "Entitlement mode: Enforce, Audit or Off.",
    },
    {
        "name": "Entitled",
        "type": "integer",
        "jsonPath": ".status.pods.registered",
        "description": "Pods registered with a verified signature.",
    },
    {
        "name": "Denied",
        "type": "integer",
        "jsonPath": ".status.pods.denied",
        "description": "Pods AWS Marketplace refused (they stay gated); see the Entitled condition.",
    },
    {
        "name": "Last Metered Hour",
        "type": "string",
        "jsonPath": ".status.metering.lastSentHour",
        "description": "The latest hour whose MeterUsage records were all sent.",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "The Ready condition's status.",
    },
    {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since the MeteredProduct was created.",
    },
]


def openapi_schema() -> dict[str, Any]:
    """The ``openAPIV3Schema`` of the v1alpha1 version."""
    spec = structural(product.MeteredProductSpec)
    # Status is written only by the operator, which always writes complete values: API-server
    # defaults there would only make the stored object differ from what the operator wrote.
    status = structural(product.MeteredProductStatus, keep_defaults=False)
    return {
        "type": "object",
        "description": ROOT_DESCRIPTION,
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object.",
            },
            "kind": {
                "type": "string",
                "description": "Kind is the REST resource this object represents.",
            },
            # The API server supplies metadata's schema and refuses anything but its type here.
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": product.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "marketplace-metering-operator"},
        },
        "spec": {
            "group": product.GROUP,
            "names": {
                "kind": product.KIND,
                "listKind": product.LIST_KIND,
                "plural": product.PLURAL,
                "singular": product.SINGULAR,
                "shortNames": list(product.SHORT_NAMES),
                "categories": list(product.CATEGORIES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": product.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }
