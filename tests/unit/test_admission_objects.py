"""The admission policy objects, as data (their CEL runs on the real API server in tests/e2e)."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from metering_operator.admission import cel
from metering_operator.admission.objects import (
    POLICY_SET_LABEL,
    Install,
    build,
    chart_fragments,
    service_account_of,
)
from metering_operator.domain.product import SCHEDULING_GATE

USER = "system:serviceaccount:ops:mmo"


def test_pod_spec_fields_cover_the_clients_pod_spec() -> None:
    """The operator's pod writes compare every PodSpec field but the gates; a new field must be added."""
    fields = set(client.V1PodSpec.attribute_map.values())
    assert set(cel.POD_SPEC_FIELDS) == fields - {"schedulingGates"}


def test_service_account_usernames() -> None:
    assert service_account_of(USER) == ("ops", "mmo")
    assert service_account_of("kubernetes-admin") is None
    assert service_account_of("system:serviceaccount::x") is None
    assert service_account_of("system:node:n1") is None


def test_build_names_binds_and_labels_every_object() -> None:
    install = Install(
        prefix="p", operator_user=USER, operator_namespace="ops", operator_service_account="mmo"
    )
    objects = build(install)
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == install.names()
    assert {o["metadata"]["labels"][POLICY_SET_LABEL] for o in objects} == {"p"}
    policies = {o["metadata"]["name"]: o for o in objects if not o["kind"].endswith("Binding")}
    bindings = {o["metadata"]["name"]: o for o in objects if o["kind"].endswith("Binding")}
    assert (
        set(policies)
        == set(bindings)
        == {
            "p-pod-records",
            "p-workload-records",
            "p-cronjob-records",
            "p-product-pods",
            "p-operator",
            "p-gate",
        }
    )
    for name, binding in bindings.items():
        assert binding["spec"]["policyName"] == name
    # The identity comes first, as every fragment's expressions expect.
    for policy in policies.values():
        names = [v["name"] for v in policy["spec"]["variables"]]
        assert tuple(names[: len(cel.IDENTITY_VARIABLES)]) == cel.IDENTITY_VARIABLES
        assert policy["spec"]["failurePolicy"] == "Fail"
    assert policies["p-pod-records"]["spec"]["variables"][0] == {
        "name": "operatorUser",
        "expression": json.dumps(USER),
    }


def test_products_are_params_and_none_found_allows() -> None:
    """parameterNotFoundAction Deny is applied before match conditions (seen on the real API
    server: it refused the controller manager's TokenRequests), so no binding uses it."""
    objects = {(o["kind"], o["metadata"]["name"]): o for o in build(Install("p", USER))}
    for kind, name in (
        ("ValidatingAdmissionPolicy", "p-product-pods"),
        ("MutatingAdmissionPolicy", "p-gate"),
    ):
        assert objects[(kind, name)]["spec"]["paramKind"] == {
            "apiVersion": "marketplace.metering.dev/v1alpha1",
            "kind": "MeteredProduct",
        }
        assert objects[(f"{kind}Binding", name)]["spec"]["paramRef"] == {
            "selector": {},
            "parameterNotFoundAction": "Allow",
        }
    params = [o for o in objects.values() if "paramRef" in o["spec"]]
    assert {o["metadata"]["name"] for o in params} == {"p-product-pods", "p-gate"}


def test_operator_policies_match_only_the_operator_and_every_namespace() -> None:
    objects = {(o["kind"], o["metadata"]["name"]): o for o in build(Install("p", USER, namespaces=("shop",)))}
    for name in ("p-operator",):
        policy = objects[("ValidatingAdmissionPolicy", name)]
        assert policy["spec"]["matchConditions"] == [
            {"name": "operator", "expression": f"request.userInfo.username == {json.dumps(USER)}"}
        ]
        # Not limited to the watched namespaces: kube-system is refused by the policy itself.
        assert "matchResources" not in objects[("ValidatingAdmissionPolicyBinding", name)]["spec"]
    selector = objects[("ValidatingAdmissionPolicyBinding", "p-pod-records")]["spec"]["matchResources"]
    assert selector == {
        "namespaceSelector": {
            "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}]
        }
    }


@pytest.mark.parametrize(
    ("install", "absent"),
    [
        (Install("p", "kubernetes-admin", bound_operator=False), {"p-operator"}),
        (Install("p", USER, mutating=False), {"p-gate"}),
    ],
)
def test_optional_parts(install: Install, absent: set[str]) -> None:
    names = {o["metadata"]["name"] for o in build(install)}
    assert not names & absent
    assert "p-pod-records" in names


def test_all_namespaces_excludes_kube_system() -> None:
    binding = next(
        o
        for o in build(Install("p", USER))
        if o["metadata"]["name"] == "p-product-pods" and "Binding" in o["kind"]
    )
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system"]}
    ]


def test_trusted_codes_are_a_cel_list() -> None:
    policy = build(Install("p", USER, trusted_codes=("b", "a")))[0]
    trusted = next(v for v in policy["spec"]["variables"] if v["name"] == "trustedCodes")
    assert json.loads(trusted["expression"]) == ["a", "b"]


def test_chart_fragments_carry_every_policy_without_identity() -> None:
    fragments = chart_fragments()
    assert set(fragments["validating"]) == set(cel.VALIDATING)
    assert set(fragments["mutating"]) == set(cel.MUTATING)
    for fragment in [*fragments["validating"].values(), *fragments["mutating"].values()]:
        names = {v["name"] for v in fragment["spec"]["variables"]}
        assert not names & set(cel.IDENTITY_VARIABLES), "the install supplies the identity"
    gate = fragments["mutating"]["gate"]["spec"]["mutations"][0]["applyConfiguration"]["expression"]
    assert SCHEDULING_GATE in gate


def test_selector_cel_names_every_operator() -> None:
    text = cel.selects("l", "s")
    for operator in ("'In'", "'NotIn'", "'Exists'", "'DoesNotExist'"):
        assert operator in text


def test_pins_are_a_cel_map_and_list() -> None:
    install = Install("p", USER, pins=(("b", "shop/db", True), ("a", "shop/cache", False)))
    variables = {v["name"]: v["expression"] for v in build(install)[0]["spec"]["variables"]}
    assert json.loads(variables["pinnedProducts"]) == {"a": "shop/cache", "b": "shop/db"}
    assert json.loads(variables["pinnedEnforce"]) == ["b"]
    empty = {v["name"]: v["expression"] for v in build(Install("p", USER))[0]["spec"]["variables"]}
    assert (empty["pinnedProducts"], empty["pinnedEnforce"]) == ("{}", "[]")
