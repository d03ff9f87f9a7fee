"""A buyer with the built-in ``edit`` role tries to run an Enforce product without paying.

The chart is installed (list mode, watching one product namespace; the MutatingAdmissionPolicy adds
the gate, no webhook). The buyer is a ServiceAccount bound to the built-in ``edit`` ClusterRole in
the product namespace only, acting with its own token. Every bypass is tried three times: before
the operator ever ran, while it runs (as the chart's ServiceAccount, with that token alone), and
after it stopped. Each must be refused by the API server -- the test asserts the refusal text -- or
end with the pod held behind the gate (never scheduled).

While the operator runs, an entitled buyer's Deployment is still granted: exactly one RegisterUsage
and one operator write per pod. Pods of another product (Audit mode) and unrelated pods are never
touched, and the operator's own pods (its namespace and ServiceAccount) are never gated: see
``test_policies_leave_other_and_operator_pods_alone``.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from devtools.cluster import ClusterInfo, bin_path
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_PRODUCT,
    ANNOTATION_SIGNATURE,
    GROUP,
    PLURAL,
    SCHEDULING_GATE,
    VERSION,
)
from tests.chart.helmcli import Helm
from tests.conftest import temporary_namespace
from tests.e2e.conftest import (  # noqa: F401  (fixtures, registered by importing them)
    BUYER_ROLE,
    PRODUCT_CODE,
    UNENTITLED_ROLE,
    OperatorFactory,
    buyer_emulator,
    metered_product_crd,
    operator,
    wait_for,
)
from tests.emulator.harness import EmulatorProcess
from tests.identities import edit_user, outcome, refused_once_in_force, token_kubeconfig

pytestmark = pytest.mark.cluster

PRODUCT_LABELS = {"app.kubernetes.io/name": "buyer-product"}
# The product's selector also has matchExpressions: tier NotIn [free].
FREE_TIER = {**PRODUCT_LABELS, "tier": "free"}
OTHER_LABELS = {"app.kubernetes.io/name": "other-product"}
FAKE_JWT = "eyJhbGciOiJQUzI1NiIsInR5cCI6IkpXVCJ9.eyJub25jZSI6ImZvcmdlZCJ9.c2lnbmF0dXJl"

WRITE_BY_OPERATOR_ONLY = "only the metering operator"
TEMPLATE_REFUSED = "must not carry marketplace.metering.dev/* annotations"
NEEDS_GATE = "must be created with the scheduling gate marketplace.metering.dev/entitlement"
RELABEL_REFUSED = "relabelling a running pod into the selector"
# The edit role has no pods/ephemeralcontainers; for roles that do, the product policy refuses
# ("no ephemeral container may be added", tests/e2e/test_admission_policies.py).
NO_EPHEMERAL = 'cannot patch resource "pods/ephemeralcontainers"'
GATE_REMOVAL = ("removes the scheduling gate", "removing the scheduling gate")
GRANT_RECORD = (WRITE_BY_OPERATOR_ONLY, "changing the operator's grant annotations")
# The API server's own validation: a pod with a node may not carry scheduling gates (the policy
# added one), and one without gates would be refused by the policy.
PINNED = "spec.nodeName: Forbidden: cannot be set until all schedulingGates have been cleared"
NOT_ALLOWED = "cannot "  # RBAC: 'User "..." cannot patch resource ...' (the edit role lacks it)


def pod_body(name: str, labels: dict[str, str], sa: str = "default", **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": sa,
        "containers": [{"name": "app", "image": "example.invalid/product:1"}],
    }
    spec.update(extra.pop("spec", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels, **extra},
        "spec": spec,
    }


def template(
    labels: dict[str, str], annotations: dict[str, str] | None = None, sa: str = "default"
) -> dict[str, Any]:
    return {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "serviceAccountName": sa,
            "restartPolicy": "Always",
            "containers": [{"name": "app", "image": "example.invalid/product:1"}],
        },
    }


def forged(signature: str = FAKE_JWT) -> dict[str, str]:
    return {
        ANNOTATION_ENTITLEMENT: "Granted",
        ANNOTATION_PRODUCT: PRODUCT_CODE,
        ANNOTATION_SIGNATURE: signature,
    }


def gates_of(p: Any) -> set[str]:
    return {g.name for g in p.spec.scheduling_gates or []}


@dataclass
class World:
    cluster: ClusterInfo
    kube: client.ApiClient
    buyer: client.ApiClient
    buyer_kubeconfig: Path
    ns: str
    operator_ns: str
    operator_sa: str
    tmp: Path
    signature: str = FAKE_JWT
    failures: list[str] = field(default_factory=list)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.buyer)

    @property
    def apps(self) -> client.AppsV1Api:
        return client.AppsV1Api(self.buyer)

    @property
    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.buyer)

    def admin_pod(self, name: str) -> Any:
        return client.CoreV1Api(self.kube).read_namespaced_pod(name, self.ns)

    def kubectl(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(bin_path("kubectl")), "--kubeconfig", str(self.buyer_kubeconfig), "-n", self.ns, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )


# --- the bypasses ---------------------------------------------------------------------------------
# Each returns the API server's refusal (ApiException or a kubectl result), or the name of a pod
# it managed to create, which must then be held behind the gate.

Attempt = Callable[[World, str], Any]


def forged_pod(w: World, tag: str) -> Any:
    """A product pod created with the operator's Granted annotations and no gate."""
    return outcome(
        w.core.create_namespaced_pod, w.ns, pod_body(f"forged-{tag}", PRODUCT_LABELS, annotations=forged())
    )


def copied_signature_pod(w: World, tag: str) -> Any:
    """A real signature copied from a granted pod onto a new pod."""
    return outcome(
        w.core.create_namespaced_pod,
        w.ns,
        pod_body(f"copied-{tag}", PRODUCT_LABELS, annotations=forged(w.signature)),
    )


def forged_deployment(w: World, tag: str) -> Any:
    body = {
        "metadata": {"name": f"forged-{tag}"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": PRODUCT_LABELS},
            "template": template(PRODUCT_LABELS, forged()),
        },
    }
    return outcome(w.apps.create_namespaced_deployment, w.ns, body)


def forged_statefulset(w: World, tag: str) -> Any:
    body = {
        "metadata": {"name": f"forged-sts-{tag}"},
        "spec": {
            "serviceName": "x",
            "selector": {"matchLabels": PRODUCT_LABELS},
            "template": template(PRODUCT_LABELS, forged()),
        },
    }
    return outcome(w.apps.create_namespaced_stateful_set, w.ns, body)


def forged_daemonset(w: World, tag: str) -> Any:
    body = {
        "metadata": {"name": f"forged-ds-{tag}"},
        "spec": {"selector": {"matchLabels": PRODUCT_LABELS}, "template": template(PRODUCT_LABELS, forged())},
    }
    return outcome(w.apps.create_namespaced_daemon_set, w.ns, body)


def forged_replicaset(w: World, tag: str) -> Any:
    body = {
        "metadata": {"name": f"forged-rs-{tag}"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": PRODUCT_LABELS},
            "template": template(PRODUCT_LABELS, forged()),
        },
    }
    return outcome(w.apps.create_namespaced_replica_set, w.ns, body)


def forged_job(w: World, tag: str) -> Any:
    tpl = template(PRODUCT_LABELS, forged())
    tpl["spec"]["restartPolicy"] = "Never"
    return outcome(
        w.batch.create_namespaced_job,
        w.ns,
        {"metadata": {"name": f"forged-job-{tag}"}, "spec": {"template": tpl}},
    )


def forged_cronjob(w: World, tag: str) -> Any:
    tpl = template(PRODUCT_LABELS, forged())
    tpl["spec"]["restartPolicy"] = "Never"
    body = {
        "metadata": {"name": f"forged-cron-{tag}"},
        "spec": {"schedule": "* * * * *", "jobTemplate": {"spec": {"template": tpl}}},
    }
    return outcome(w.batch.create_namespaced_cron_job, w.ns, body)


def annotate_deployment_summary(w: World, tag: str) -> Any:
    """Writing the operator's workload summary on a Deployment the buyer owns."""
    w.apps.create_namespaced_deployment(
        w.ns,
        {
            "metadata": {"name": f"plain-{tag}"},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": OTHER_LABELS},
                "template": template(OTHER_LABELS),
            },
        },
    )
    patch = {"metadata": {"annotations": {ANNOTATION_ENTITLEMENT: "Granted 3/3"}}}
    return outcome(w.apps.patch_namespaced_deployment, f"plain-{tag}", w.ns, patch)


def annotation_after_creation_on_template(w: World, tag: str) -> Any:
    """An annotation added to a Deployment's pod template after it was created."""
    patch = {"spec": {"template": {"metadata": {"annotations": {ANNOTATION_ENTITLEMENT: "Granted"}}}}}
    return outcome(w.apps.patch_namespaced_deployment, f"plain-{tag}", w.ns, patch)


def job_of_product(w: World, tag: str) -> Any:
    """A Job running the product: its pod must be held behind the gate."""
    tpl = template(PRODUCT_LABELS)
    tpl["spec"]["restartPolicy"] = "Never"
    w.batch.create_namespaced_job(w.ns, {"metadata": {"name": f"job-{tag}"}, "spec": {"template": tpl}})
    pods = wait_for(
        "the Job's pod",
        lambda: w.core.list_namespaced_pod(w.ns, label_selector=f"job-name=job-{tag}").items,
        timeout=120,
    )
    return pods[0].metadata.name


def statefulset_of_product(w: World, tag: str) -> Any:
    w.apps.create_namespaced_stateful_set(
        w.ns,
        {
            "metadata": {"name": f"sts-{tag}"},
            "spec": {
                "serviceName": "x",
                "selector": {"matchLabels": PRODUCT_LABELS},
                "template": template(PRODUCT_LABELS),
            },
        },
    )
    wait_for(
        "the StatefulSet's pod",
        lambda: outcome(w.core.read_namespaced_pod, f"sts-{tag}-0", w.ns) is None,
        120,
    )
    return f"sts-{tag}-0"


def part_of_label(w: World, tag: str) -> Any:
    """The label the old webhook exempted: anyone can set it, so it exempts nothing."""
    labels = {**PRODUCT_LABELS, "app.kubernetes.io/part-of": "marketplace-metering-operator"}
    w.core.create_namespaced_pod(w.ns, pod_body(f"partof-{tag}", labels))
    return f"partof-{tag}"


def operators_service_account_name(w: World, tag: str) -> Any:
    """A pod running as a ServiceAccount named like the operator's (in the buyer's namespace)."""
    try:
        w.core.create_namespaced_service_account(w.ns, {"metadata": {"name": w.operator_sa}})
    except ApiException as err:
        if err.status != 409:
            raise
    w.core.create_namespaced_pod(w.ns, pod_body(f"as-operator-{tag}", PRODUCT_LABELS, sa=w.operator_sa))
    return f"as-operator-{tag}"


def remove_gate_json_patch(w: World, tag: str) -> Any:
    return outcome(
        w.core.patch_namespaced_pod, f"held-{tag}", w.ns, [{"op": "remove", "path": "/spec/schedulingGates"}]
    )


def remove_gate_merge_patch(w: World, tag: str) -> Any:
    return outcome(w.core.patch_namespaced_pod, f"held-{tag}", w.ns, {"spec": {"schedulingGates": None}})


def replace_without_gate(w: World, tag: str) -> Any:
    """`kubectl replace` of the held pod with its manifest minus the gate."""
    current = w.kubectl("get", "pod", f"held-{tag}", "-o", "json")
    assert current.returncode == 0, (current.stderr, w.kubectl("get", "pods", "-o", "wide"))
    body = json.loads(current.stdout)
    body["spec"].pop("schedulingGates", None)
    return w.kubectl("replace", "-f", "-", stdin=json.dumps(body))


def annotate_granted(w: World, tag: str) -> Any:
    patch = {
        "metadata": {"annotations": {ANNOTATION_ENTITLEMENT: "Granted", ANNOTATION_PRODUCT: PRODUCT_CODE}}
    }
    return outcome(w.core.patch_namespaced_pod, f"held-{tag}", w.ns, patch)


def copied_signature_onto_held(w: World, tag: str) -> Any:
    return outcome(
        w.core.patch_namespaced_pod, f"held-{tag}", w.ns, {"metadata": {"annotations": forged(w.signature)}}
    )


def ephemeral_container(w: World, tag: str) -> Any:
    patch = {"spec": {"ephemeralContainers": [{"name": "debug", "image": "example.invalid/product:1"}]}}
    return outcome(w.core.patch_namespaced_pod_ephemeralcontainers, f"held-{tag}", w.ns, patch)


def pinned_node(w: World, tag: str) -> Any:
    """Skipping the scheduler: a product pod created bound to a node."""
    nodes = client.CoreV1Api(w.kube).list_node().items
    body = pod_body(f"pinned-{tag}", PRODUCT_LABELS, spec={"nodeName": nodes[0].metadata.name})
    return outcome(w.core.create_namespaced_pod, w.ns, body)


def relabel_bystander(w: World, tag: str) -> Any:
    return outcome(
        w.core.patch_namespaced_pod, f"bystander-{tag}", w.ns, {"metadata": {"labels": PRODUCT_LABELS}}
    )


def relabel_with_kubectl(w: World, tag: str) -> Any:
    labels = [f"{k}={v}" for k, v in PRODUCT_LABELS.items()]
    return w.kubectl("label", "pod", f"bystander-{tag}", *labels, "--overwrite")


def annotate_bystander(w: World, tag: str) -> Any:
    """Forging the grant on a running unrelated pod first, to relabel it afterwards."""
    return outcome(
        w.core.patch_namespaced_pod, f"bystander-{tag}", w.ns, {"metadata": {"annotations": forged()}}
    )


def switch_product_to_audit(w: World, tag: str) -> Any:
    patch = {"spec": {"entitlement": {"mode": "Audit"}}}
    return outcome(
        client.CustomObjectsApi(w.buyer).patch_namespaced_custom_object,
        GROUP,
        VERSION,
        w.ns,
        PLURAL,
        "product",
        patch,
    )


def delete_product(w: World, tag: str) -> Any:
    return outcome(
        client.CustomObjectsApi(w.buyer).delete_namespaced_custom_object,
        GROUP,
        VERSION,
        w.ns,
        PLURAL,
        "product",
    )


def decoy_product(w: World, tag: str) -> Any:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeteredProduct",
        "metadata": {"name": f"decoy-{tag}"},
        "spec": {
            "productCode": PRODUCT_CODE,
            "publicKeyVersion": 1,
            "publicKey": {"configMapKeyRef": {"name": "x", "key": "k"}},
            "selector": {"matchLabels": {"x": "y"}},
            "entitlement": {"mode": "Off"},
        },
    }
    return outcome(
        client.CustomObjectsApi(w.buyer).create_namespaced_custom_object, GROUP, VERSION, w.ns, PLURAL, body
    )


def delete_policy(w: World, tag: str) -> Any:
    return outcome(
        client.CustomObjectsApi(w.buyer).delete_cluster_custom_object,
        "admissionregistration.k8s.io",
        "v1",
        "validatingadmissionpolicybindings",
        f"{w.operator_sa}-product-pods",
    )


#: name -> (attempt, what must come of it: a refusal text, or GATED for a pod held behind the gate).
GATED = "held behind the gate"
BYPASSES: dict[str, tuple[Attempt, str | tuple[str, ...]]] = {
    "pod with forged Granted annotations": (forged_pod, WRITE_BY_OPERATOR_ONLY),
    "pod with a copied signature": (copied_signature_pod, WRITE_BY_OPERATOR_ONLY),
    "Deployment template with Granted": (forged_deployment, TEMPLATE_REFUSED),
    "StatefulSet template with Granted": (forged_statefulset, TEMPLATE_REFUSED),
    "DaemonSet template with Granted": (forged_daemonset, TEMPLATE_REFUSED),
    "ReplicaSet template with Granted": (forged_replicaset, TEMPLATE_REFUSED),
    "Job template with Granted": (forged_job, TEMPLATE_REFUSED),
    "CronJob template with Granted": (forged_cronjob, TEMPLATE_REFUSED),
    "workload summary annotation": (annotate_deployment_summary, WRITE_BY_OPERATOR_ONLY),
    "template annotation added later": (annotation_after_creation_on_template, TEMPLATE_REFUSED),
    "a Job of the product": (job_of_product, GATED),
    "a StatefulSet of the product": (statefulset_of_product, GATED),
    "part-of label exemption": (part_of_label, GATED),
    "the operator's ServiceAccount name": (operators_service_account_name, GATED),
    "remove the gate (JSON patch)": (remove_gate_json_patch, GATE_REMOVAL),
    "remove the gate (merge patch)": (remove_gate_merge_patch, GATE_REMOVAL),
    "kubectl replace without the gate": (replace_without_gate, GATE_REMOVAL),
    "annotate a held pod Granted": (annotate_granted, WRITE_BY_OPERATOR_ONLY),
    "copy a signature onto a held pod": (copied_signature_onto_held, WRITE_BY_OPERATOR_ONLY),
    "ephemeral container on a held pod": (ephemeral_container, NO_EPHEMERAL),
    "pod bound to a node directly": (pinned_node, PINNED),
    "relabel a running pod (patch)": (relabel_bystander, RELABEL_REFUSED),
    "relabel a running pod (kubectl label)": (relabel_with_kubectl, RELABEL_REFUSED),
    "forge the grant on a running pod": (annotate_bystander, WRITE_BY_OPERATOR_ONLY),
    "switch the product to Audit": (switch_product_to_audit, NOT_ALLOWED),
    "delete the product": (delete_product, NOT_ALLOWED),
    "a decoy product": (decoy_product, NOT_ALLOWED),
    "delete the policy binding": (delete_policy, NOT_ALLOWED),
}


def prepare(w: World, tag: str) -> None:
    """The pods the attempts work on: one held behind the gate, one unrelated and running."""
    w.core.create_namespaced_pod(w.ns, pod_body(f"held-{tag}", PRODUCT_LABELS, sa="unentitled"))
    assert SCHEDULING_GATE in gates_of(w.admin_pod(f"held-{tag}")), (
        "the MutatingAdmissionPolicy adds the gate"
    )
    w.core.create_namespaced_pod(w.ns, pod_body(f"bystander-{tag}", {"app": "bystander"}))
    # Not selected (tier NotIn [free]): relabelling into the labels alone is allowed.
    w.core.patch_namespaced_pod(f"bystander-{tag}", w.ns, {"metadata": {"labels": {"role": "web"}}})
    wait_for(
        "the unrelated pod to run",
        lambda: w.admin_pod(f"bystander-{tag}").status.phase == "Running",
        timeout=120,
    )


def try_all(w: World, tag: str) -> list[str]:
    """Every bypass as the buyer; returns what was not refused or not held."""
    prepare(w, tag)
    failures = []
    for name, (attempt, expected) in BYPASSES.items():
        result = attempt(w, tag)
        if expected == GATED:
            held = w.admin_pod(result)
            scheduled = {c.type: (c.status, c.reason) for c in held.status.conditions or []}.get(
                "PodScheduled"
            )
            if SCHEDULING_GATE not in gates_of(held) or held.spec.node_name:
                failures.append(f"{tag}: {name}: pod {result} is not held ({held.spec.node_name=})")
            elif scheduled not in (None, ("False", "SchedulingGated")):
                failures.append(f"{tag}: {name}: pod {result} condition {scheduled}")
            continue
        if isinstance(result, subprocess.CompletedProcess):
            text, refused = result.stderr, result.returncode != 0
        elif isinstance(result, ApiException):
            text, refused = json.loads(result.body)["message"], result.status in (403, 422)
        else:
            text, refused = "accepted", False
        texts = (expected,) if isinstance(expected, str) else expected
        if not refused or not any(t in text for t in texts):
            failures.append(f"{tag}: {name}: expected a refusal with {expected!r}, got: {text[:400]}")
    # The buyer's unrelated pod still runs, ungated and unannotated: the policies left it alone.
    bystander = w.admin_pod(f"bystander-{tag}")
    assert not gates_of(bystander)
    assert not [k for k in bystander.metadata.annotations or {} if k.startswith(GROUP)]
    return failures


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def product_namespace(kube: client.ApiClient) -> Iterator[str]:
    with temporary_namespace(kube, "t-buyer-") as name:
        yield name


def product_objects(namespace: str, public_key_pem: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "product-public-key", "namespace": namespace},
            "data": {"public.pem": public_key_pem},
        },
        *[
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {
                    "name": sa,
                    "namespace": namespace,
                    "annotations": {"eks.amazonaws.com/role-arn": role},
                },
            }
            for sa, role in (("product", BUYER_ROLE), ("unentitled", UNENTITLED_ROLE))
        ],
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": "product", "namespace": namespace},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "publicKey": {"configMapKeyRef": {"name": "product-public-key", "key": "public.pem"}},
                "selector": {
                    "matchLabels": PRODUCT_LABELS,
                    "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["free"]}],
                },
                "entitlement": {"mode": "Enforce", "scope": "Pod"},
            },
        },
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeteredProduct",
            "metadata": {"name": "other", "namespace": namespace},
            "spec": {
                "productCode": PRODUCT_CODE,
                "publicKeyVersion": 1,
                "publicKey": {"configMapKeyRef": {"name": "product-public-key", "key": "public.pem"}},
                "selector": {"matchLabels": OTHER_LABELS},
                "entitlement": {"mode": "Audit", "scope": "Pod"},
            },
        },
    ]


def create_all(kube: client.ApiClient, objects: list[dict[str, Any]]) -> None:
    from kubernetes import utils

    custom = client.CustomObjectsApi(kube)
    for obj in objects:
        if obj["kind"] == "MeteredProduct":
            custom.create_namespaced_custom_object(GROUP, VERSION, obj["metadata"]["namespace"], PLURAL, obj)
        else:
            utils.create_from_dict(kube, obj)


def wait_policies(kube: client.ApiClient, namespace: str) -> None:
    """Until every policy of the chart is in force in ``namespace``, probed with dry runs as admin.

    The API server loads each new policy, binding and param on its own, asynchronously (seconds
    on a loaded machine): right after `helm install` one may be enforced and another not yet.
    """
    core, apps, batch = client.CoreV1Api(kube), client.AppsV1Api(kube), client.BatchV1Api(kube)
    wait_for(
        "the MutatingAdmissionPolicy",
        lambda: (
            SCHEDULING_GATE
            in gates_of(
                core.create_namespaced_pod(namespace, pod_body("probe", PRODUCT_LABELS), dry_run="All")
            )
        ),
        timeout=60,
    )
    core.create_namespaced_pod(namespace, pod_body("probe-bystander", {"app": "probe"}))
    cron_template = template(PRODUCT_LABELS, forged())
    cron_template["spec"]["restartPolicy"] = "Never"
    probes: dict[str, Callable[[], Any]] = {
        WRITE_BY_OPERATOR_ONLY: lambda: core.create_namespaced_pod(
            namespace, pod_body("probe-forged", PRODUCT_LABELS, annotations=forged()), dry_run="All"
        ),
        TEMPLATE_REFUSED: lambda: apps.create_namespaced_deployment(
            namespace,
            {
                "metadata": {"name": "probe"},
                "spec": {
                    "selector": {"matchLabels": PRODUCT_LABELS},
                    "template": template(PRODUCT_LABELS, forged()),
                },
            },
            dry_run="All",
        ),
        "job template must not carry": lambda: batch.create_namespaced_cron_job(
            namespace,
            {
                "metadata": {"name": "probe"},
                "spec": {
                    "schedule": "* * * * *",
                    "jobTemplate": {
                        "metadata": {"annotations": forged()},
                        "spec": {"template": cron_template},
                    },
                },
            },
            dry_run="All",
        ),
        RELABEL_REFUSED: lambda: core.patch_namespaced_pod(
            "probe-bystander", namespace, {"metadata": {"labels": PRODUCT_LABELS}}, dry_run="All"
        ),
    }
    for text, probe in probes.items():
        refused_once_in_force(probe, text, timeout=60)


class PodWrites:
    """Counts, per pod, the writes that changed its gate or its marketplace.metering.dev annotations."""

    def __init__(self, kube: client.ApiClient, namespace: str, selector: str) -> None:
        self.counts: dict[str, int] = {}
        self._last: dict[str, tuple[Any, ...]] = {}
        self._watch = watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(kube, namespace, selector), daemon=True)
        self._thread.start()

    def _run(self, kube: client.ApiClient, namespace: str, selector: str) -> None:
        try:
            self._follow(kube, namespace, selector)
        except Exception:  # the stream closes under us when the test stops it
            self.closed = True

    closed = False

    def _follow(self, kube: client.ApiClient, namespace: str, selector: str) -> None:
        core = client.CoreV1Api(kube)
        for event in self._watch.stream(
            core.list_namespaced_pod, namespace, label_selector=selector, timeout_seconds=600
        ):
            p = event["object"]
            ours = tuple(
                sorted((k, v) for k, v in (p.metadata.annotations or {}).items() if k.startswith(GROUP))
            )
            state = (ours, tuple(sorted(gates_of(p))))
            name = p.metadata.name
            if event["type"] == "ADDED":
                self._last[name] = state
                self.counts.setdefault(name, 0)
            elif event["type"] == "MODIFIED" and self._last.get(name) != state:
                self._last[name] = state
                self.counts[name] = self.counts.get(name, 0) + 1

    def stop(self) -> None:
        self._watch.stop()


def test_every_bypass_is_refused_with_the_operator_down_up_and_stopped(
    cluster: ClusterInfo,
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    product_namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
    buyer_emulator: EmulatorProcess,  # noqa: F811
    operator: OperatorFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    name = f"mmo-{namespace}"
    values = {
        "fullnameOverride": name,
        "watchNamespaces": [product_namespace],
        "trustedProductCodes": [PRODUCT_CODE],
        "admissionPolicies": {"gate": "policy"},
    }
    try:
        cluster_helm.install(name, namespace, values=values)
        create_all(
            kube, product_objects(product_namespace, buyer_emulator.admin.public_key_pem(PRODUCT_CODE, 1))
        )
        wait_policies(kube, product_namespace)
        buyer = edit_user(cluster, kube, product_namespace, tmp_path / "buyer-client.kubeconfig")
        buyer_kubeconfig = token_kubeconfig(
            cluster, kube, product_namespace, "buyer", tmp_path / "buyer.kubeconfig"
        )
        w = World(cluster, kube, buyer, buyer_kubeconfig, product_namespace, namespace, name, tmp_path)
        failures = try_all(w, "never-ran")

        # The operator comes up, as the chart's ServiceAccount with its token alone.
        chart_sa = token_kubeconfig(cluster, kube, namespace, name, tmp_path / "chart-sa.kubeconfig")
        writes = PodWrites(kube, product_namespace, "app=paid")
        op = operator(
            product_namespace,
            buyer_emulator,
            webhook=False,
            extra_args=["--operator-namespace", namespace, "--trusted-product-code", PRODUCT_CODE],
            extra_env={"KUBECONFIG": str(chart_sa)},
        )
        # An entitled buyer's Deployment, created by the buyer: granted, one registration and one
        # operator write per pod.
        paid_labels = {**PRODUCT_LABELS, "app": "paid"}
        w.apps.create_namespaced_deployment(
            product_namespace,
            {
                "metadata": {"name": "paid"},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": paid_labels},
                    "template": template(paid_labels, sa="product"),
                },
            },
        )
        core = client.CoreV1Api(kube)

        def granted() -> list[Any] | None:
            pods = core.list_namespaced_pod(product_namespace, label_selector="app=paid").items
            done = [
                p
                for p in pods
                if (p.metadata.annotations or {}).get(ANNOTATION_ENTITLEMENT) == "Granted" and not gates_of(p)
            ]
            return done if len(pods) == 3 and len(done) == 3 else None

        pods = wait_for("the entitled pods granted", granted, timeout=240)
        registrations = buyer_emulator.admin.registrations(PRODUCT_CODE)
        for p in pods:
            assert len([r for r in registrations if r["nonce"] == p.metadata.uid]) == 1, registrations
        time.sleep(0)  # the watch thread has seen the grant writes: they came before `granted`
        wait_for(
            "the watch to see every grant", lambda: all(writes.counts.get(p.metadata.name) for p in pods), 30
        )
        assert {p.metadata.name: writes.counts[p.metadata.name] for p in pods} == {
            p.metadata.name: 1 for p in pods
        }
        w.signature = (pods[0].metadata.annotations or {})[ANNOTATION_SIGNATURE]
        held = wait_for(
            "the unentitled held pod denied",
            lambda: (
                (
                    core.read_namespaced_pod("held-never-ran", product_namespace).metadata.annotations or {}
                ).get(ANNOTATION_ENTITLEMENT)
                == "Denied"
            ),
            timeout=120,
        )
        assert held
        # A granted pod's records can't be changed by the buyer either.
        granted_pod = pods[0].metadata.name
        for patch in (
            {"metadata": {"annotations": {ANNOTATION_PRODUCT: "other/other"}}},
            {"metadata": {"annotations": {ANNOTATION_ENTITLEMENT: None}}},
        ):
            err = outcome(w.core.patch_namespaced_pod, granted_pod, product_namespace, patch)
            if err is None or not any(t in str(err.body) for t in GRANT_RECORD):
                failures.append(f"up: changing a granted pod's record {patch}: {err}")
        failures += try_all(w, "up")
        assert "Forbidden" not in op.log(), op.log()[-4000:]
        writes.stop()

        op.stop()
        failures += try_all(w, "stopped")
        # Scaled while the operator is stopped: the new pod waits behind the gate.
        w.apps.patch_namespaced_deployment_scale("paid", product_namespace, {"spec": {"replicas": 4}})
        fourth = wait_for(
            "the fourth pod",
            lambda: [
                p
                for p in core.list_namespaced_pod(product_namespace, label_selector="app=paid").items
                if gates_of(p)
            ],
            timeout=120,
        )
        assert len(fourth) == 1
        assert not fourth[0].spec.node_name
        assert failures == [], "\n".join(failures)
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_policies_leave_other_and_operator_pods_alone(
    cluster_helm: Helm,
    kube: client.ApiClient,
    namespace: str,
    metered_product_crd: dict[str, Any],  # noqa: F811
) -> None:
    """Namespaced mode (the default): products beside the operator. Its own pods (its namespace and
    ServiceAccount) are never gated even when a product's selector matches them; a pod of another
    ServiceAccount with the same labels is; an Audit product's and unrelated pods are not."""
    name = f"mmo-{namespace}"
    values = {"fullnameOverride": name, "admissionPolicies": {"gate": "policy"}}
    try:
        cluster_helm.install(name, namespace, values=values)
        create_all(kube, [o for o in product_objects(namespace, "unused") if o["kind"] != "ConfigMap"])
        wait_policies(kube, namespace)
        core = client.CoreV1Api(kube)
        created = {
            "operator": core.create_namespaced_pod(
                namespace, pod_body("operator-like", PRODUCT_LABELS, sa=name)
            ),
            "product": core.create_namespaced_pod(
                namespace, pod_body("product", PRODUCT_LABELS, sa="product")
            ),
            "audit": core.create_namespaced_pod(namespace, pod_body("audit", OTHER_LABELS)),
            "unrelated": core.create_namespaced_pod(namespace, pod_body("unrelated", {"app": "unrelated"})),
            "free-tier": core.create_namespaced_pod(namespace, pod_body("free", FREE_TIER)),
        }
        assert {k: SCHEDULING_GATE in gates_of(p) for k, p in created.items()} == {
            "operator": False,
            "product": True,
            "audit": False,
            "unrelated": False,
            "free-tier": False,
        }
        # Ordinary updates of those pods pass (the policies only refuse what turns a pod ungranted).
        for pod_name in ("operator-like", "audit", "unrelated", "free"):
            core.patch_namespaced_pod(pod_name, namespace, {"metadata": {"labels": {"touched": "yes"}}})
    finally:
        cluster_helm.run("uninstall", name, "--namespace", namespace, "--ignore-not-found", check=False)


def test_install_bundle_policies_render_for_its_namespace() -> None:
    """The plain bundle carries the same policies, bound to its own namespace and ServiceAccount."""
    from tests.chart.helmcli import BUNDLE_NAMESPACE, BUNDLE_RELEASE, INSTALL_BUNDLE

    objects = [o for o in yaml.safe_load_all(INSTALL_BUNDLE.read_text()) if o]
    policies = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    assert len(policies) == 5
    for policy in policies:
        user = next(v for v in policy["spec"]["variables"] if v["name"] == "operatorUser")
        assert user["expression"] == json.dumps(f"system:serviceaccount:{BUNDLE_NAMESPACE}:{BUNDLE_RELEASE}")
