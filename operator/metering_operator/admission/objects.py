"""The admission policy objects of one install, built around the fragments of :mod:`.cel`.

Local mode (``metering-operator run --webhook-url``) applies :func:`build`; the chart renders the
same fragments (``files/admission-policies.yaml``, written by ``metering-operator manifests``)
with the same identity variables and bindings, and tests/chart/test_policies.py checks that both
give the same objects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from metering_operator.admission import cel
from metering_operator.domain.product import API_VERSION, GROUP, KIND

ADMISSION_API: Final = "admissionregistration.k8s.io/v1"
#: Label carried by every policy object of one install (value: the install's prefix).
POLICY_SET_LABEL: Final = f"{GROUP}/policy-set"


@dataclass(frozen=True)
class Install:
    """Who the operator is and what it watches, for one set of policies."""

    #: Object names are ``<prefix>-<suffix>``.
    prefix: str
    #: The operator's username as the API server sees it.
    operator_user: str
    #: Where the operator's own pods run and as which service account ('' when it has none).
    operator_namespace: str = ""
    operator_service_account: str = ""
    #: Watched namespaces; empty: every namespace except ``excluded_namespaces``.
    namespaces: tuple[str, ...] = ()
    excluded_namespaces: tuple[str, ...] = (cel.PROTECTED_NAMESPACE,)
    trusted_codes: tuple[str, ...] = ()
    #: Seller pins: (product code, ``namespace/name`` of its one MeteredProduct, minimum mode is Enforce).
    pins: tuple[tuple[str, str, bool], ...] = ()
    #: Also install the MutatingAdmissionPolicy that adds the gate (Kubernetes >= 1.36).
    mutating: bool = True
    #: Also bound the operator's own writes (only for a service account: a human admin running
    #: the operator locally keeps their own rights).
    bound_operator: bool = True

    def names(self) -> list[tuple[str, str]]:
        """(kind, name) of every policy this install has, bindings included."""
        result: list[tuple[str, str]] = []
        for suffix, (_, _, operator_only) in cel.VALIDATING.items():
            if operator_only and not self.bound_operator:
                continue
            name = f"{self.prefix}-{suffix}"
            result += [("ValidatingAdmissionPolicy", name), ("ValidatingAdmissionPolicyBinding", name)]
        if self.mutating:
            for suffix in cel.MUTATING:
                name = f"{self.prefix}-{suffix}"
                result += [("MutatingAdmissionPolicy", name), ("MutatingAdmissionPolicyBinding", name)]
        return result


def service_account_of(username: str) -> tuple[str, str] | None:
    """``(namespace, name)`` of a service account username, or None for any other identity."""
    parts = username.split(":")
    if len(parts) == 4 and parts[:2] == ["system", "serviceaccount"] and parts[2] and parts[3]:
        return parts[2], parts[3]
    return None


def cel_string(text: str) -> str:
    """A CEL string literal (JSON string syntax is valid CEL)."""
    return json.dumps(text)


def identity_variables(install: Install) -> list[dict[str, str]]:
    return [
        {"name": "operatorUser", "expression": cel_string(install.operator_user)},
        {"name": "operatorNamespace", "expression": cel_string(install.operator_namespace)},
        {"name": "operatorServiceAccount", "expression": cel_string(install.operator_service_account)},
        {"name": "trustedCodes", "expression": _json(sorted(install.trusted_codes))},
        {"name": "pinnedProducts", "expression": _json({code: key for code, key, _ in install.pins})},
        {
            "name": "pinnedEnforce",
            "expression": _json(sorted(code for code, _, enforce in install.pins if enforce)),
        },
    ]


def _json(value: Any) -> str:
    """A CEL list or map literal, written exactly as Helm's toJson writes it (the chart's copy)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def namespace_selector(install: Install) -> dict[str, Any]:
    key = "kubernetes.io/metadata.name"
    if install.namespaces:
        return {"matchExpressions": [{"key": key, "operator": "In", "values": sorted(install.namespaces)}]}
    return {
        "matchExpressions": [{"key": key, "operator": "NotIn", "values": sorted(install.excluded_namespaces)}]
    }


def operator_condition(install: Install) -> dict[str, str]:
    return {
        "name": "operator",
        "expression": f"request.userInfo.username == {cel_string(install.operator_user)}",
    }


def _metadata(install: Install, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "labels": {
            "app.kubernetes.io/part-of": "marketplace-metering-operator",
            POLICY_SET_LABEL: install.prefix,
        },
    }


def _policy_spec(
    install: Install, fragment: dict[str, Any], params: bool, operator_only: bool
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if params:
        spec["paramKind"] = {"apiVersion": API_VERSION, "kind": KIND}
    spec.update({k: v for k, v in fragment.items() if k != "variables"})
    if operator_only:
        spec["matchConditions"] = [operator_condition(install)]
    spec["variables"] = identity_variables(install) + fragment["variables"]
    return spec


def _binding_spec(install: Install, name: str, params: bool, operator_only: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"policyName": name}
    if params:
        # Every MeteredProduct in the request's namespace, each evaluated on its own; none: nothing
        # to enforce. (Never Deny: it applies before match conditions, to everyone's requests.)
        spec["paramRef"] = {"selector": {}, "parameterNotFoundAction": "Allow"}
    if not operator_only:
        spec["matchResources"] = {"namespaceSelector": namespace_selector(install)}
    return spec


def build(install: Install) -> list[dict[str, Any]]:
    """Every policy and binding of ``install``, in the order they must be applied."""
    objects: list[dict[str, Any]] = []
    for suffix, (fragment, params, operator_only) in cel.VALIDATING.items():
        if operator_only and not install.bound_operator:
            continue
        name = f"{install.prefix}-{suffix}"
        binding = _binding_spec(install, name, params, operator_only)
        binding["validationActions"] = ["Deny"]
        objects += [
            {
                "apiVersion": ADMISSION_API,
                "kind": "ValidatingAdmissionPolicy",
                "metadata": _metadata(install, name),
                "spec": _policy_spec(install, fragment(), params, operator_only),
            },
            {
                "apiVersion": ADMISSION_API,
                "kind": "ValidatingAdmissionPolicyBinding",
                "metadata": _metadata(install, name),
                "spec": binding,
            },
        ]
    if install.mutating:
        for suffix, mutating_fragment in cel.MUTATING.items():
            name = f"{install.prefix}-{suffix}"
            objects += [
                {
                    "apiVersion": ADMISSION_API,
                    "kind": "MutatingAdmissionPolicy",
                    "metadata": _metadata(install, name),
                    "spec": _policy_spec(install, mutating_fragment(), True, False),
                },
                {
                    "apiVersion": ADMISSION_API,
                    "kind": "MutatingAdmissionPolicyBinding",
                    "metadata": _metadata(install, name),
                    "spec": _binding_spec(install, name, True, False),
                },
            ]
    return objects


def chart_fragments() -> dict[str, Any]:
    """What the chart's template reads: each fragment with how it is bound."""
    validating = {
        suffix: {"params": params, "operatorOnly": operator_only, "spec": build_fragment()}
        for suffix, (build_fragment, params, operator_only) in cel.VALIDATING.items()
    }
    mutating = {
        suffix: {"params": True, "operatorOnly": False, "spec": build_fragment()}
        for suffix, build_fragment in cel.MUTATING.items()
    }
    return {"validating": validating, "mutating": mutating}
