"""The admission policies' CEL on the real API server (objects as local mode builds them).

* Label selectors: the policies' CEL selector matching agrees, label set by label set, with the API
  server's own ``labelSelector`` (ground truth) for matchLabels and every matchExpressions operator,
  for the ValidatingAdmissionPolicy (refused iff selected) and the MutatingAdmissionPolicy (gated
  iff selected).
* Local mode: ``metering-operator run --webhook-url`` installs the policies bound to the identity a
  SelfSubjectReview reports, and leaves them in force when it stops.

The buyer's bypasses, the operator's bounds and both flows end to end run against the chart's
rendering of the same policies in tests/chart/test_policies_as_buyer.py and
tests/chart/test_operator_as_chart_sa.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devtools.cluster import ClusterInfo
from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.admission import install as policy_install
from metering_operator.admission.objects import Install, build
from metering_operator.domain.product import GROUP, PLURAL, SCHEDULING_GATE, VERSION, LabelSelector
from metering_operator.domain.selectors import matches, to_query
from tests.conftest import temporary_namespace
from tests.e2e.conftest import PRODUCT_CODE, OperatorFactory, wait_for
from tests.identities import outcome, refused_once_in_force

pytestmark = pytest.mark.cluster

OPERATOR_USER = "system:serviceaccount:mmo-policy-tests:operator"

SELECTORS: dict[str, dict[str, Any]] = {
    "matchLabels": {"matchLabels": {"app": "product", "tier": "paid"}},
    "In+NotIn": {
        "matchLabels": {"app": "product"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["paid", "gold"]},
            {"key": "env", "operator": "NotIn", "values": ["dev", "test"]},
        ],
    },
    "Exists+DoesNotExist": {
        "matchExpressions": [
            {"key": "example.com/paid", "operator": "Exists"},
            {"key": "example.com/free", "operator": "DoesNotExist"},
        ]
    },
}

LABEL_SETS: list[dict[str, str]] = [
    {},
    {"app": "product"},
    {"app": "product", "tier": "paid"},
    {"app": "product", "tier": "gold"},
    {"app": "product", "tier": "free"},
    {"app": "product", "tier": "paid", "env": "dev"},
    {"app": "product", "tier": "gold", "env": "test"},
    {"app": "product", "tier": "paid", "env": "prod"},
    {"app": "other", "tier": "paid"},
    {"tier": "paid"},
    {"example.com/paid": ""},
    {"example.com/paid": "yes", "example.com/free": "x"},
    {"example.com/free": "yes"},
    {"app": "product", "tier": "paid", "example.com/paid": "1"},
    {"APP": "product", "tier": "paid"},
]


def product(name: str, selector: dict[str, Any], mode: str = "Enforce") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": name},
        "spec": {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "publicKey": {"configMapKeyRef": {"name": "unused", "key": "public.pem"}},
            "selector": selector,
            "entitlement": {"mode": mode, "scope": "Pod"},
        },
    }


def pod(name: str, labels: dict[str, str], gates: list[str] = ()) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "schedulingGates": [{"name": g} for g in gates] or None,
            "containers": [{"name": "app", "image": "example.invalid/app:1"}],
        },
    }


@pytest.fixture
def policy_sets(kube: client.ApiClient) -> Iterator[list[str]]:
    """Prefixes of policy sets a test applied; removed afterwards."""
    prefixes: list[str] = []
    yield prefixes
    for prefix in prefixes:
        policy_install.delete(kube, prefix)


def wait_enforced(kube: client.ApiClient, namespace: str, labels: dict[str, str], *, mutating: bool) -> None:
    """Until the API server applies the just-created policies and params to ``namespace``."""
    core = client.CoreV1Api(kube)

    def active() -> bool:
        try:
            created = core.create_namespaced_pod(namespace, pod("probe", labels), dry_run="All")
        except ApiException as err:
            # Refused by the validating policy: in force, unless the mutating one should have
            # gated the pod first and is not loaded yet.
            return not mutating and err.status == 403 and "ValidatingAdmissionPolicy" in str(err.body)
        gates = {g.name for g in created.spec.scheduling_gates or []}
        return mutating and SCHEDULING_GATE in gates

    wait_for(f"policies in force in {namespace}", active, timeout=60)


def test_selector_cel_agrees_with_the_api_servers_label_selectors(
    kube: client.ApiClient,
    metered_product_crd: dict[str, Any],
    policy_sets: list[str],
) -> None:
    core = client.CoreV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    with (
        temporary_namespace(kube, "t-truth-") as truth,
        temporary_namespace(kube, "t-vap-a-") as vap_a,
        temporary_namespace(kube, "t-vap-b-") as vap_b,
        temporary_namespace(kube, "t-vap-c-") as vap_c,
        temporary_namespace(kube, "t-map-a-") as map_a,
        temporary_namespace(kube, "t-map-b-") as map_b,
        temporary_namespace(kube, "t-map-c-") as map_c,
    ):
        # Ground truth: the API server's own selector over real pods carrying each label set
        # (held by a gate of their own; no policy applies to this namespace).
        for i, labels in enumerate(LABEL_SETS):
            core.create_namespaced_pod(truth, pod(f"p{i}", labels, ["example.com/hold"]))
        truth_sets = {}
        for name, selector in SELECTORS.items():
            query = to_query(LabelSelector.model_validate(selector))
            listed = core.list_namespaced_pod(truth, label_selector=query).items
            truth_sets[name] = {int(p.metadata.name[1:]) for p in listed}
            # The operator's own Python matching agrees as well.
            python = {
                i
                for i, labels in enumerate(LABEL_SETS)
                if matches(LabelSelector.model_validate(selector), labels)
            }
            assert python == truth_sets[name], name
            assert 0 < len(truth_sets[name]) < len(LABEL_SETS), f"{name}: the table must exercise both sides"

        validating = dict(zip(SELECTORS, (vap_a, vap_b, vap_c), strict=True))
        mutating = dict(zip(SELECTORS, (map_a, map_b, map_c), strict=True))
        prefix = f"mmo-t-{vap_a}"
        policy_sets.append(prefix)
        policy_sets.append(f"{prefix}-m")
        policy_install.apply(
            kube, Install(prefix, OPERATOR_USER, namespaces=tuple(validating.values()), mutating=False)
        )
        policy_install.apply(
            kube, Install(f"{prefix}-m", OPERATOR_USER, namespaces=tuple(mutating.values()), mutating=True)
        )
        for name, selector in SELECTORS.items():
            for ns in (validating[name], mutating[name]):
                custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, product("p", selector))
        for name in SELECTORS:
            first = LABEL_SETS[min(truth_sets[name])]
            wait_enforced(kube, validating[name], first, mutating=False)
            wait_enforced(kube, mutating[name], first, mutating=True)

        disagreements = []
        for (name, _), (i, labels) in itertools.product(SELECTORS.items(), enumerate(LABEL_SETS)):
            selected = i in truth_sets[name]
            # ValidatingAdmissionPolicy alone: an ungated pod is refused iff the product selects it.
            error = outcome(core.create_namespaced_pod, validating[name], pod(f"v{i}", labels), dry_run="All")
            refused = error is not None
            if error is not None:
                assert error.status == 403, error.body
                assert "must be created with the scheduling gate" in error.body
            # MutatingAdmissionPolicy (and the validating ones): gated iff selected, never refused.
            created = core.create_namespaced_pod(mutating[name], pod(f"m{i}", labels), dry_run="All")
            gated = SCHEDULING_GATE in {g.name for g in created.spec.scheduling_gates or []}
            if refused != selected or gated != selected:
                disagreements.append((name, labels, selected, refused, gated))
        assert disagreements == [], "(selector, labels, API server selects, VAP refused, MAP gated)"


def test_audit_untrusted_and_decoy_products_are_not_enforced_pinned_ones_are(
    kube: client.ApiClient, namespace: str, metered_product_crd: dict[str, Any], policy_sets: list[str]
) -> None:
    core = client.CoreV1Api(kube)
    custom = client.CustomObjectsApi(kube)
    prefix = f"mmo-t-{namespace}"
    policy_sets.append(prefix)
    pinned_code = "pinnedproduct00000000001"
    policy_install.apply(
        kube,
        Install(
            prefix,
            OPERATOR_USER,
            namespaces=(namespace,),
            trusted_codes=(PRODUCT_CODE, pinned_code),
            pins=((pinned_code, f"{namespace}/pinned", True),),
        ),
    )
    # A seller pin: the pinned product is held in Enforce even when it says Audit; another product
    # with the pinned code (a decoy) holds nothing.
    pinned = product("pinned", {"matchLabels": {"app": "pinned"}}, "Audit")
    pinned["spec"]["productCode"] = pinned_code
    decoy = product("decoy", {"matchLabels": {"app": "decoy"}})
    decoy["spec"]["productCode"] = pinned_code
    for body in (pinned, decoy):
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, product("enforced", {"matchLabels": {"app": "enforced"}})
    )
    custom.create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, product("audited", {"matchLabels": {"app": "audited"}}, "Audit")
    )
    untrusted = product("untrusted", {"matchLabels": {"app": "untrusted"}})
    untrusted["spec"]["productCode"] = "someoneelsesproduct00001"
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, untrusted)
    wait_enforced(kube, namespace, {"app": "enforced"}, mutating=True)
    wait_enforced(kube, namespace, {"app": "pinned"}, mutating=True)
    cases = (
        ("enforced", True),
        ("audited", False),
        ("untrusted", False),
        ("unrelated", False),
        ("pinned", True),
        ("decoy", False),
    )
    for app, gated in cases:
        created = core.create_namespaced_pod(namespace, pod(app, {"app": app}))
        assert (SCHEDULING_GATE in {g.name for g in created.spec.scheduling_gates or []}) is gated, app


def test_local_mode_installs_policies_for_its_identity_and_leaves_them_in_force(
    cluster: ClusterInfo,
    kube: client.ApiClient,
    namespace: str,
    operator: OperatorFactory,
    tmp_path: Path,
) -> None:
    """As whoever runs it (here the admin kubeconfig): policies for that user, no operator bounds
    (a person's own rights are not narrowed), and still there after the process stops."""
    op = operator(namespace, None, policies=True)
    assert op.webhook_configuration is not None
    prefix = op.webhook_configuration
    custom = client.CustomObjectsApi(kube)
    review = client.AuthenticationV1Api(kube).create_self_subject_review(client.V1SelfSubjectReview())
    admin = review.status.user_info.username

    def installed() -> dict[str, dict[str, Any]]:
        found = {}
        for plural in ("validatingadmissionpolicies", "mutatingadmissionpolicies"):
            items = custom.list_cluster_custom_object(
                "admissionregistration.k8s.io",
                "v1",
                plural,
                label_selector=f"{GROUP}/policy-set={prefix}",
            )["items"]
            found.update({i["metadata"]["name"]: i for i in items})
        return found

    policies = installed()
    expected = {o["metadata"]["name"] for o in build(Install(prefix, admin, bound_operator=False))}
    assert set(policies) == expected
    for policy in policies.values():
        user = next(v for v in policy["spec"]["variables"] if v["name"] == "operatorUser")
        assert user["expression"] == f'"{admin}"'
    assert f"admission policies for {admin}" in op.log()

    op.stop()
    assert not op.alive()
    # The webhook configuration goes with the process; the policies stay in force.
    with pytest.raises(ApiException) as err:
        client.AdmissionregistrationV1Api(kube).read_mutating_webhook_configuration(prefix)
    assert err.value.status == 404
    assert set(installed()) == expected


def test_policies_bind_cluster_admins_too(
    kube: client.ApiClient, namespace: str, metered_product_crd: dict[str, Any], policy_sets: list[str]
) -> None:
    """Admission is not authorization: the policies refuse the cluster admin as well (here: the
    ephemeral container the `edit` role cannot even ask for, gate removal, forged grants)."""
    core = client.CoreV1Api(kube)
    prefix = f"mmo-t-{namespace}"
    policy_sets.append(prefix)
    policy_install.apply(kube, Install(prefix, OPERATOR_USER, namespaces=(namespace,)))
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, product("enforced", {"matchLabels": {"app": "enforced"}})
    )
    wait_enforced(kube, namespace, {"app": "enforced"}, mutating=True)
    held = core.create_namespaced_pod(namespace, pod("held", {"app": "enforced"}))
    assert SCHEDULING_GATE in {g.name for g in held.spec.scheduling_gates or []}
    # Dry runs (admission runs, nothing is stored), repeated until each policy has loaded: the API
    # server loads a new policy, binding and param asynchronously, each on its own.
    attempts = {
        "no ephemeral container may be added": lambda: core.patch_namespaced_pod_ephemeralcontainers(
            "held",
            namespace,
            {"spec": {"ephemeralContainers": [{"name": "dbg", "image": "example.invalid/x:1"}]}},
            dry_run="All",
        ),
        "scheduling gate marketplace.metering.dev/entitlement": lambda: core.patch_namespaced_pod(
            "held", namespace, {"spec": {"schedulingGates": None}}, dry_run="All"
        ),
        "only the metering operator": lambda: core.patch_namespaced_pod(
            "held",
            namespace,
            {"metadata": {"annotations": {"marketplace.metering.dev/entitlement": "Granted"}}},
            dry_run="All",
        ),
    }
    for text, call in attempts.items():
        assert refused_once_in_force(call, text).status == 403
    still = core.read_namespaced_pod("held", namespace)
    assert SCHEDULING_GATE in {g.name for g in still.spec.scheduling_gates or []}
    assert not still.spec.ephemeral_containers
