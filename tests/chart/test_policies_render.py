"""The chart's admission policies, RBAC and watch modes as rendered by the real Helm CLI.

For every documented mode (namespaced, list, cluster-wide, cert-manager, emulator): the RBAC is
namespaced unless cluster-wide was chosen, and the admission policies are the ones local mode
builds (metering_operator.admission.objects, one source of CEL), bound to the chart's
ServiceAccount and to the watched namespaces, never kube-system. Which gate mechanism is used for
which server version, and that the choice can be forced either way.
"""

from __future__ import annotations

from typing import Any

import pytest

from metering_operator.admission.objects import Install, build
from tests.chart.helmcli import Helm, HelmError, by_kind, one

RELEASE = "mmo"
NAMESPACE = "metering-system"
FULLNAME = "mmo-marketplace-metering-operator"
USER = f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"

PIN_KEY = {"publicKey": "-----BEGIN PUBLIC KEY-----\nMA==\n-----END PUBLIC KEY-----\n", "publicKeyVersion": 1}

#: Documented modes: values -> the watched namespaces ([] = every namespace but kube-system).
MODES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "namespaced": ({}, [NAMESPACE]),
    "list": ({"watchNamespaces": ["shop", "billing"]}, ["billing", "shop"]),
    "cluster-wide": ({"watch": {"mode": "cluster"}}, []),
    "cert-manager": (
        {"admissionPolicies": {"gate": "webhook"}, "webhook": {"certificate": {"source": "certManager"}}},
        [NAMESPACE],
    ),
    "emulator": ({"emulator": {"enabled": True}, "trustedProductCodes": ["abc123"]}, [NAMESPACE]),
    "pins": (
        {
            "watchNamespaces": ["shop"],
            "pins": [
                {"productCode": "abc123", "namespace": "shop", "name": "db", **PIN_KEY},
                {
                    "productCode": "def456",
                    "namespace": "shop",
                    "name": "cache",
                    "minMode": "Audit",
                    **PIN_KEY,
                },
            ],
        },
        ["shop"],
    ),
}


def admission_objects(objects: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects if "AdmissionPolicy" in o["kind"]}


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_renders_the_local_mode_policies_bound_to_the_chart(helm: Helm, mode: str) -> None:
    values, watched = MODES[mode]
    objects = helm.render(release=RELEASE, namespace=NAMESPACE, values=values)
    rendered = admission_objects(objects)
    webhook = bool(by_kind(objects, "MutatingWebhookConfiguration"))
    expected = admission_objects(
        build(
            Install(
                prefix=FULLNAME,
                operator_user=USER,
                operator_namespace=NAMESPACE,
                operator_service_account=FULLNAME,
                namespaces=tuple(watched),
                trusted_codes=tuple(values.get("trustedProductCodes", ())),
                pins=tuple(
                    (
                        p["productCode"],
                        f"{p['namespace']}/{p['name']}",
                        p.get("minMode", "Enforce") == "Enforce",
                    )
                    for p in values.get("pins", ())
                ),
                mutating=not webhook,
            )
        )
    )
    assert sorted(rendered) == sorted(expected)
    for key, obj in expected.items():
        assert rendered[key]["spec"] == obj["spec"], key
    # RBAC: the namespaced rules only where the operator watches.
    container = next(
        c for c in one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]["containers"]
    )
    if watched:
        assert not [o for o in by_kind(objects, "ClusterRole") if o["metadata"]["name"] == FULLNAME]
        roles = {
            r["metadata"]["namespace"] for r in by_kind(objects, "Role") if r["metadata"]["name"] == FULLNAME
        }
        assert roles == set(watched)
        assert sorted(
            a.removeprefix("--namespace=") for a in container["args"] if a.startswith("--namespace=")
        ) == (sorted(watched))
    else:
        one(objects, "ClusterRole", FULLNAME)
        assert "--all-namespaces" in container["args"]
    assert "kube-system" not in str([r["metadata"].get("namespace") for r in by_kind(objects, "Role")])


@pytest.mark.parametrize(
    ("kube_version", "gate", "expected"),
    [
        ("1.35.4", "auto", "webhook"),
        ("1.36.0", "auto", "policy"),
        ("1.37.2", "auto", "policy"),
        ("1.37.2", "webhook", "webhook"),
        ("1.35.4", "policy", "policy"),
    ],
)
def test_gate_mechanism_follows_the_server_version(
    helm: Helm, kube_version: str, gate: str, expected: str
) -> None:
    result = helm.run(
        "template",
        RELEASE,
        str(helm_chart()),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        "--set",
        f"admissionPolicies.gate={gate}",
    )
    import yaml

    objects = [o for o in yaml.safe_load_all(result.stdout) if o]
    kinds = {o["kind"] for o in objects}
    assert ("MutatingWebhookConfiguration" in kinds) is (expected == "webhook")
    assert ("MutatingAdmissionPolicy" in kinds) is (expected == "policy")
    # The validating policies are there either way (GA since 1.30).
    assert len(by_kind(objects, "ValidatingAdmissionPolicy")) == 5


def helm_chart() -> Any:
    from tests.chart.helmcli import CHART

    return CHART


def test_metered_product_write_is_not_in_edit_unless_asked(helm: Helm) -> None:
    def aggregated(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
        result: dict[str, set[str]] = {}
        for role in by_kind(objects, "ClusterRole"):
            labels = role["metadata"].get("labels", {})
            for target in ("view", "edit", "admin"):
                if labels.get(f"rbac.authorization.k8s.io/aggregate-to-{target}") == "true":
                    verbs = {v for rule in role["rules"] for v in rule["verbs"]}
                    result.setdefault(target, set()).update(verbs)
        return result

    default = aggregated(helm.render())
    assert default == {
        "view": {"get", "list", "watch"},
        "edit": {"get", "list", "watch"},
        "admin": {"get", "list", "watch"},
    }
    opted = aggregated(helm.render(set_values=["rbac.aggregateWriteToEditAndAdmin=true"]))
    assert {"create", "update", "patch", "delete"} <= opted["edit"]


def test_policies_can_be_turned_off_and_operator_bounds_alone(helm: Helm) -> None:
    objects = helm.render(set_values=["admissionPolicies.enabled=false", "admissionPolicies.gate=webhook"])
    assert not admission_objects(objects)
    objects = helm.render(set_values=["admissionPolicies.boundOperator=false"])
    names = {name for _, name in admission_objects(objects)}
    assert f"{FULLNAME}-operator" not in names
    assert f"{FULLNAME}-product-pods" in names


@pytest.mark.parametrize(
    ("set_values", "message"),
    [
        (["watch.mode=cluster", "watchNamespaces={a}"], "leave watchNamespaces empty"),
        (["watch.mode=list"], "watch.mode=list needs the namespaces in watchNamespaces"),
        (["watchNamespaces={a,kube-system}"], "watchNamespaces"),
        (["watch.mode=everything"], "at '/watch/mode'"),
        (["admissionPolicies.gate=sometimes"], "at '/admissionPolicies/gate'"),
    ],
)
def test_bad_watch_and_policy_values_are_refused(helm: Helm, set_values: list[str], message: str) -> None:
    with pytest.raises(HelmError) as err:
        helm.template(set_values=set_values)
    assert message in err.value.stderr
