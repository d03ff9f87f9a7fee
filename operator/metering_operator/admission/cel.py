"""The CEL of the admission policies, as data: one source for the chart, the bundle and local mode.

Every policy here is a *fragment*: match rules, variables, validations (or mutations) and the
failure policy. What differs per install -- object names, the namespaces bound, the operator's
identity and the trusted product codes -- is added around it by :mod:`.objects` (local mode) or
by the chart's templates, always as these leading variables, which every expression below uses:

``variables.operatorUser``
    the operator's username (``system:serviceaccount:<ns>:<sa>`` in a cluster);
``variables.operatorNamespace`` / ``variables.operatorServiceAccount``
    where the operator's own pods run and as whom (empty in local mode: no pods);
``variables.trustedCodes``
    the operator's trusted product codes (empty: every code is served);
``variables.pinnedProducts`` / ``variables.pinnedEnforce``
    the seller's pins: product code -> the one ``namespace/name`` that may use it, and the codes
    pinned to at least ``Enforce`` (a pinned product is held in Enforce whatever mode it says).

The policies (names are suffixes of the install's prefix):

``pod-records``
    nobody but the operator writes, changes or removes ``marketplace.metering.dev/*`` pod
    annotations (at CREATE too: pods made by controllers from templates), and nobody but the
    operator removes the entitlement gate. Only because of this may the products policy read
    the operator's ``Granted`` annotation as a proven grant.
``workload-records`` / ``cronjob-records``
    likewise on Deployments, StatefulSets, DaemonSets, Jobs and CronJobs (their metadata is the
    operator's summary), and no pod template carries such an annotation at all (ReplicaSets:
    only the template, because the Deployment controller copies Deployment annotations onto
    its ReplicaSets).
``product-pods`` (params: every MeteredProduct in the request's namespace, one at a time)
    a pod selected by a trusted ``Enforce`` product is created with the gate, and no update
    turns a compliant pod into one that runs ungranted: gate removal, or relabelling into the
    selector, without the operator's grant for this product; no ephemeral container is added
    to such a pod before its grant.
``operator``
    the operator's own writes: on pods only gate removal and its annotations, on workloads only
    its annotations, on MeteredProducts never the spec, nothing at all in ``kube-system``.
    A TokenRequest by the operator only bound to a Pod (the API server itself then checks that
    the pod runs as the requested ServiceAccount), audience exactly ``sts.amazonaws.com``, at
    most one hour. "Only in a namespace with a MeteredProduct" is NOT expressible: a binding's
    ``parameterNotFoundAction: Deny`` is applied before its match conditions, so it refused every
    TokenRequest (the controller manager's too) in namespaces without a product; RBAC confines
    the operator's tokens to the watched namespaces instead.
``gate`` (MutatingAdmissionPolicy, params)
    adds the gate to new pods a trusted ``Enforce`` product selects, without a webhook.

The operator's own pods (its namespace and service account, which nobody can fake without
already holding the operator's rights) are never gated or refused as product pods.
"""

from __future__ import annotations

from typing import Any, Final

from metering_operator.domain.product import (
    ANNOTATION_ENTITLEMENT,
    ANNOTATION_PRODUCT,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    SCHEDULING_GATE,
)

PREFIX: Final = f"{GROUP}/"
STS_AUDIENCE: Final = "sts.amazonaws.com"
MAX_TOKEN_SECONDS: Final = 3600
PROTECTED_NAMESPACE: Final = "kube-system"

#: The identity variables every fragment expects first (filled per install).
IDENTITY_VARIABLES: Final = (
    "operatorUser",
    "operatorNamespace",
    "operatorServiceAccount",
    "trustedCodes",
    "pinnedProducts",
    "pinnedEnforce",
)

#: Every field of core/v1 PodSpec (Kubernetes 1.36). The operator's pod writes must leave each one
#: unchanged except ``schedulingGates``; tests/unit/test_admission_cel.py fails when the client's
#: PodSpec grows a field this list does not have.
POD_SPEC_FIELDS: Final = (
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "containers",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "hostnameOverride",
    "imagePullSecrets",
    "initContainers",
    "nodeName",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "schedulingGroup",
    "securityContext",
    "serviceAccount",
    "serviceAccountName",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
)

WORKLOADS_WITH_TEMPLATE: Final = (
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("apps", "daemonsets"),
    ("apps", "replicasets"),
    ("batch", "jobs"),
)
#: Workloads whose metadata annotations are the operator's summary (or could be copied from one).
SUMMARY_WORKLOADS: Final = ("deployments", "statefulsets", "daemonsets", "jobs", "cronjobs")


def _q(text: str) -> str:
    """A CEL string literal (the values here never contain quotes or backslashes)."""
    if "'" in text or "\\" in text:
        raise ValueError(f"not a plain CEL string: {text!r}")
    return f"'{text}'"


def _var(name: str, expression: str) -> dict[str, str]:
    return {"name": name, "expression": expression}


def _rule(group: str, resources: list[str], operations: list[str], version: str = "v1") -> dict[str, Any]:
    return {
        "apiGroups": [group],
        "apiVersions": [version],
        "operations": operations,
        "resources": resources,
        "scope": "Namespaced",
    }


# --- reusable pieces -------------------------------------------------------------------------------

IS_OPERATOR = "request.userInfo.username == variables.operatorUser"
#: The object's name for messages (a pod made from generateName has none yet at admission).
NAME = _var(
    "name",
    "request.?name.orValue('') != '' ? request.name : object.?metadata.?generateName.orValue('')",
)


def _annotation_vars(new: str, old: str, prefix: str = "") -> list[dict[str, str]]:
    """Variables over the annotations of ``new`` / ``old`` (metadata paths, optional steps allowed).

    ``<prefix>NewAnn``/``OldAnn`` maps, our keys in each (``NewOurs``/``OldOurs``), and whether ours
    are unchanged (``OursUnchanged``) or only removed (``OursOnlyRemoved``). ``old`` is only read on
    UPDATE (``oldObject`` is null on CREATE).
    """

    def n(name: str) -> str:
        return f"{prefix}{name}" if prefix else name[0].lower() + name[1:]

    def v(name: str) -> str:
        return f"variables.{n(name)}"

    return [
        _var(n("NewAnn"), f"{new}.?annotations.orValue({{}})"),
        _var(n("OldAnn"), f"request.operation == 'UPDATE' ? {old}.?annotations.orValue({{}}) : {{}}"),
        _var(n("NewOurs"), f"{v('NewAnn')}.filter(k, k.startsWith({_q(PREFIX)}))"),
        _var(n("OldOurs"), f"{v('OldAnn')}.filter(k, k.startsWith({_q(PREFIX)}))"),
        # Same keys with the same values: nothing of ours written, changed or removed.
        _var(
            n("OursUnchanged"),
            f"size({v('NewOurs')}) == size({v('OldOurs')}) && {v('NewOurs')}.all(k, "
            f"k in {v('OldAnn')} && {v('OldAnn')}[k] == {v('NewAnn')}[k])",
        ),
        # Only removals (a template may drop what it should never have carried).
        _var(
            n("OursOnlyRemoved"),
            f"{v('NewOurs')}.all(k, k in {v('OldAnn')} && {v('OldAnn')}[k] == {v('NewAnn')}[k])",
        ),
    ]


def _others_unchanged(new: str, old: str) -> str:
    """Every annotation outside our prefix is the same in ``new`` and ``old`` (maps)."""
    p = _q(PREFIX)
    return (
        f"{new}.all(k, k.startsWith({p}) || (k in {old} && {old}[k] == {new}[k])) && "
        f"{old}.all(k, k.startsWith({p}) || k in {new})"
    )


def _same(field: str) -> str:
    """``object.<field>`` equals ``oldObject.<field>``, both possibly absent."""
    parent, _, leaf = field.rpartition(".")
    new, old = f"object.{parent}" if parent else "object", f"oldObject.{parent}" if parent else "oldObject"
    return f"(has({new}.{leaf}) == has({old}.{leaf}) && (!has({new}.{leaf}) || {new}.{leaf} == {old}.{leaf}))"


def _same_metadata_except_annotations() -> str:
    return " && ".join(_same(f"metadata.{f}") for f in ("labels", "ownerReferences", "finalizers"))


def selects(labels: str, selector: str) -> str:
    """CEL: the Kubernetes LabelSelector at ``selector`` matches the label map ``labels``.

    ``matchLabels`` all equal, and every requirement of ``matchExpressions`` (In, NotIn, Exists,
    DoesNotExist) holds; an empty selector matches every pod (as the API server's own does).
    """
    return (
        f"{selector}.?matchLabels.orValue({{}}).all(k, k in {labels} && "
        f"{labels}[k] == {selector}.matchLabels[k]) && "
        f"{selector}.?matchExpressions.orValue([]).all(e, "
        f"e.operator == 'In' ? (e.key in {labels} && {labels}[e.key] in e.?values.orValue([])) : "
        f"e.operator == 'NotIn' ? !(e.key in {labels} && {labels}[e.key] in e.?values.orValue([])) : "
        f"e.operator == 'Exists' ? e.key in {labels} : "
        f"e.operator == 'DoesNotExist' ? !(e.key in {labels}) : false)"
    )


def _gated(obj: str) -> str:
    return f"{obj}.spec.?schedulingGates.orValue([]).exists(g, g.name == {_q(SCHEDULING_GATE)})"


def _granted(obj: str) -> str:
    """The operator's grant for the product in ``params`` (its annotations only it can write).

    The product annotation names the product as ``<namespace>/<name>`` (what the operator writes)
    or by its product code.
    """
    ann = f"{obj}.metadata.?annotations.orValue({{}})"
    product = f"{ann}[?{_q(ANNOTATION_PRODUCT)}].orValue('')"
    return (
        f"({ann}[?{_q(ANNOTATION_ENTITLEMENT)}].orValue('') == 'Granted' && "
        f"({product} == request.namespace + '/' + params.metadata.name || "
        f"{product} == params.spec.productCode))"
    )


def _operators_own_pod(obj: str) -> str:
    """A pod of the operator itself: its namespace and its service account (not a label)."""
    return (
        f"(variables.operatorServiceAccount != '' && request.namespace == variables.operatorNamespace && "
        f"{obj}.spec.?serviceAccountName.orValue('default') == variables.operatorServiceAccount)"
    )


_MODE_ENFORCE = "params.spec.?entitlement.?mode.orValue('Enforce') == 'Enforce'"
#: The operator's own rule for whether a product holds its pods: trusted code, and mode Enforce --
#: or, for a pinned code, only the pinned MeteredProduct, at least at the pinned minimum mode.
_ENFORCED = (
    "(size(variables.trustedCodes) == 0 || params.spec.productCode in variables.trustedCodes) && "
    "(params.spec.productCode in variables.pinnedProducts ? "
    "(variables.pinnedProducts[params.spec.productCode] == request.namespace + '/' + params.metadata.name && "
    f"({_MODE_ENFORCE} || params.spec.productCode in variables.pinnedEnforce)) : {_MODE_ENFORCE})"
)


# --- the fragments --------------------------------------------------------------------------------


def pod_records() -> dict[str, Any]:
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [_rule("", ["pods"], ["CREATE", "UPDATE"])]},
        "variables": [
            NAME,
            _var("isOperator", IS_OPERATOR),
            *_annotation_vars("object.metadata", "oldObject.metadata"),
            _var(
                "gateRemoved",
                f"request.operation == 'UPDATE' && {_gated('oldObject')} && !{_gated('object')}",
            ),
        ],
        "validations": [
            {
                "expression": "variables.isOperator || variables.oursUnchanged",
                "messageExpression": (
                    f"'pod ' + variables.name + ': only the metering operator (' + variables.operatorUser"
                    f" + ') writes, changes or removes {PREFIX}* annotations; refused: ' + "
                    "(variables.newOurs + variables.oldOurs).filter(k, !(k in variables.newAnn) || "
                    "!(k in variables.oldAnn) || variables.newAnn[k] != variables.oldAnn[k]).join(', ')"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": "variables.isOperator || !variables.gateRemoved",
                "messageExpression": (
                    f"'pod ' + variables.name + ': only the metering operator removes the scheduling "
                    f"gate {SCHEDULING_GATE}, after RegisterUsage granted this pod'"
                ),
                "reason": "Forbidden",
            },
        ],
    }


def workload_records() -> dict[str, Any]:
    resources = {g: [r for gg, r in WORKLOADS_WITH_TEMPLATE if gg == g] for g, _ in WORKLOADS_WITH_TEMPLATE}
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [_rule(g, rs, ["CREATE", "UPDATE"]) for g, rs in sorted(resources.items())]
        },
        "variables": [
            NAME,
            _var("isOperator", IS_OPERATOR),
            _var("kind", "request.resource.resource"),
            *_annotation_vars("object.metadata", "oldObject.metadata"),
            *_annotation_vars(
                "object.spec.template.?metadata", "oldObject.spec.template.?metadata", prefix="template"
            ),
        ],
        "validations": [
            _summary_validation(),
            _template_validation("template"),
        ],
    }


def cronjob_records() -> dict[str, Any]:
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {"resourceRules": [_rule("batch", ["cronjobs"], ["CREATE", "UPDATE"])]},
        "variables": [
            NAME,
            _var("isOperator", IS_OPERATOR),
            _var("kind", "request.resource.resource"),
            *_annotation_vars("object.metadata", "oldObject.metadata"),
            *_annotation_vars(
                "object.spec.jobTemplate.?metadata", "oldObject.spec.jobTemplate.?metadata", prefix="job"
            ),
            *_annotation_vars(
                "object.spec.jobTemplate.spec.template.?metadata",
                "oldObject.spec.jobTemplate.spec.template.?metadata",
                prefix="template",
            ),
        ],
        "validations": [
            _summary_validation(),
            _template_validation("job", "job template"),
            _template_validation("template"),
        ],
    }


def _summary_validation() -> dict[str, Any]:
    kinds = "[" + ", ".join(_q(k) for k in SUMMARY_WORKLOADS) + "]"
    return {
        "expression": f"variables.isOperator || !(variables.kind in {kinds}) || variables.oursUnchanged",
        "messageExpression": (
            "variables.kind + ' ' + variables.name + ': only the metering operator (' + "
            f"variables.operatorUser + ') writes, changes or removes {PREFIX}* annotations'"
        ),
        "reason": "Forbidden",
    }


def _template_validation(prefix: str, what: str = "pod template") -> dict[str, Any]:
    return {
        "expression": f"variables.{prefix}OursOnlyRemoved",
        "messageExpression": (
            f"variables.kind + ' ' + variables.name + ': a {what} must not carry {PREFIX}* "
            "annotations (only the metering operator writes them, on each pod it registered): ' + "
            f"variables.{prefix}NewOurs.join(', ')"
        ),
        "reason": "Forbidden",
    }


def product_pods() -> dict[str, Any]:
    """Per MeteredProduct in the namespace (params): the gate is there or the grant is proven."""
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [_rule("", ["pods", "pods/ephemeralcontainers"], ["CREATE", "UPDATE"])]
        },
        "variables": [
            NAME,
            _var("enforced", _ENFORCED),
            _var("labels", "object.metadata.?labels.orValue({})"),
            _var(
                "oldLabels",
                "request.operation == 'UPDATE' ? oldObject.metadata.?labels.orValue({}) : {}",
            ),
            _var("selects", selects("variables.labels", "params.spec.selector")),
            _var(
                "selectedBefore",
                "request.operation == 'UPDATE' && "
                f"({selects('variables.oldLabels', 'params.spec.selector')})",
            ),
            _var("own", _operators_own_pod("object")),
            _var("granted", _granted("object")),
            _var(
                "violates",
                f"variables.enforced && variables.selects && !variables.own && !{_gated('object')} && "
                "!variables.granted",
            ),
            _var(
                "violatedBefore",
                f"request.operation == 'UPDATE' && variables.enforced && variables.selectedBefore && "
                f"!{_operators_own_pod('oldObject')} && !{_gated('oldObject')} && !{_granted('oldObject')}",
            ),
            _var("product", "params.metadata.name + ' (product ' + params.spec.productCode + ')'"),
        ],
        "validations": [
            {
                "expression": "request.operation != 'CREATE' || !variables.violates",
                "messageExpression": (
                    "'pod ' + variables.name + ': selected by the Enforce MeteredProduct ' + "
                    f"variables.product + ', so it must be created with the scheduling gate {SCHEDULING_GATE}"
                    " (the operator removes it once RegisterUsage grants this pod)'"
                ),
                "reason": "Forbidden",
            },
            {
                # An update may not turn a compliant pod into one that runs without its grant. A pod
                # that already ran ungated (created before its product) is the operator's to handle.
                "expression": (
                    "request.operation != 'UPDATE' || request.?subResource.orValue('') != '' || "
                    "!variables.violates || variables.violatedBefore"
                ),
                "messageExpression": (
                    "'pod ' + variables.name + ': ' + (!variables.selectedBefore ? 'relabelling a "
                    f"running pod into the selector' : {_gated('oldObject')} ? 'removing the scheduling "
                    f"gate {SCHEDULING_GATE}' : 'changing the operator\\'s grant annotations') + "
                    "' of the Enforce MeteredProduct ' + variables.product + ' is refused without the "
                    "grant of the operator for this pod'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": (
                    "request.?subResource.orValue('') != 'ephemeralcontainers' || !variables.enforced || "
                    "!variables.selects || variables.own || variables.granted || "
                    "size(object.spec.?ephemeralContainers.orValue([])) <= "
                    "size(oldObject.spec.?ephemeralContainers.orValue([]))"
                ),
                "messageExpression": (
                    "'pod ' + variables.name + ': no ephemeral container may be added to a pod of the "
                    "Enforce MeteredProduct ' + variables.product + ' before the operator granted it'"
                ),
                "reason": "Forbidden",
            },
        ],
    }


def operator_writes() -> dict[str, Any]:
    """The operator's own writes (matched on its username by the install): bounded to its records."""
    pod_spec_same = " && ".join(_same(f"spec.{f}") for f in POD_SPEC_FIELDS)
    gates = "object.spec.?schedulingGates.orValue([]).map(g, g.name)"
    old_gates = "oldObject.spec.?schedulingGates.orValue([]).map(g, g.name)"
    writes = ["CREATE", "UPDATE", "DELETE"]
    workload_rules = [
        _rule("apps", ["deployments", "statefulsets", "daemonsets", "replicasets"], writes),
        _rule("batch", ["jobs", "cronjobs"], writes),
    ]
    return {
        "failurePolicy": "Fail",
        "matchConstraints": {
            "resourceRules": [
                _rule("", ["pods", "pods/*", "serviceaccounts", "serviceaccounts/token"], writes),
                *workload_rules,
                _rule(GROUP, ["meteredproducts"], writes, version="*"),
                _rule("", ["configmaps"], ["DELETE"]),
            ]
        },
        "variables": [
            NAME,
            _var("kind", "request.resource.resource"),
            _var("isPod", "request.resource.resource == 'pods' && request.?subResource.orValue('') == ''"),
            _var(
                "isWorkload",
                "request.resource.group in ['apps', 'batch'] && request.?subResource.orValue('') == ''",
            ),
            _var("isProduct", "request.resource.resource == 'meteredproducts'"),
            _var("isConfigMap", "request.resource.resource == 'configmaps'"),
            _var(
                "isToken",
                "request.resource.resource == 'serviceaccounts' && "
                "request.?subResource.orValue('') == 'token'",
            ),
        ],
        "validations": [
            {
                "expression": f"request.namespace != {_q(PROTECTED_NAMESPACE)}",
                "messageExpression": (
                    f"'the metering operator ' + variables.operatorUser + ' never writes in "
                    f"{PROTECTED_NAMESPACE}'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": "!variables.isPod || request.operation == 'UPDATE'",
                "messageExpression": (
                    "'the metering operator may only update (patch) pods, not ' + request.operation"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": (
                    "!variables.isPod || request.operation != 'UPDATE' || ("
                    f"{_same_metadata_except_annotations()} && "
                    + _others_unchanged(
                        "object.metadata.?annotations.orValue({})",
                        "oldObject.metadata.?annotations.orValue({})",
                    )
                    + f" && {pod_spec_same} && ({gates} == {old_gates} || {gates} == "
                    f"{old_gates}.filter(n, n != {_q(SCHEDULING_GATE)})))"
                ),
                "messageExpression": (
                    "'pod ' + variables.name + ': the metering operator may only remove the "
                    f"scheduling gate {SCHEDULING_GATE} and write {PREFIX}* annotations'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": (
                    "!variables.isWorkload || (request.operation == 'UPDATE' && "
                    f"object.spec == oldObject.spec && {_same_metadata_except_annotations()} && "
                    + _others_unchanged(
                        "object.metadata.?annotations.orValue({})",
                        "oldObject.metadata.?annotations.orValue({})",
                    )
                    + ")"
                ),
                "messageExpression": (
                    "variables.kind + ' ' + variables.name + "
                    f"': the metering operator may only write {PREFIX}* annotations on workloads'"
                ),
                "reason": "Forbidden",
            },
            {
                # Its records of deleted products (kube/sweep.py): never anyone else's ConfigMap.
                "expression": (
                    "!variables.isConfigMap || "
                    f"oldObject.metadata.?labels[{_q(MANAGED_BY_LABEL)}].orValue('') == {_q(MANAGED_BY)}"
                ),
                "messageExpression": (
                    "'ConfigMap ' + variables.name + ': the metering operator may only delete its own "
                    f"records (label {MANAGED_BY_LABEL}={MANAGED_BY})'"
                ),
                "reason": "Forbidden",
            },
            {
                # kopf's finalizer and progress annotations only: never what the product is.
                "expression": (
                    "!variables.isProduct || (request.operation == 'UPDATE' && object.spec == oldObject.spec)"
                ),
                "messageExpression": (
                    "'MeteredProduct ' + variables.name + ': the metering operator never changes, creates "
                    "or deletes a product, only its finalizer and status'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": (
                    # An unset boundObjectRef reaches CEL as a present but empty value.
                    "!variables.isToken || (object.spec.?boundObjectRef.?kind.orValue('') == 'Pod' && "
                    "object.spec.?boundObjectRef.?apiVersion.orValue('v1') == 'v1')"
                ),
                "messageExpression": (
                    "'token for ' + request.namespace + '/' + request.name + ': the metering operator may "
                    "only mint tokens bound to a Pod'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": f"!variables.isToken || object.spec.audiences == [{_q(STS_AUDIENCE)}]",
                "messageExpression": (
                    "'token for ' + request.namespace + '/' + request.name + ': the metering operator may "
                    f"only mint tokens for the audience {STS_AUDIENCE}'"
                ),
                "reason": "Forbidden",
            },
            {
                "expression": (
                    "!variables.isToken || "
                    f"object.spec.?expirationSeconds.orValue(3600) <= {MAX_TOKEN_SECONDS}"
                ),
                "messageExpression": (
                    "'token for ' + request.namespace + '/' + request.name + ': the metering operator may "
                    f"only mint tokens valid for at most {MAX_TOKEN_SECONDS} seconds'"
                ),
                "reason": "Forbidden",
            },
        ],
    }


def gate() -> dict[str, Any]:
    """MutatingAdmissionPolicy fragment: add the gate to new pods an Enforce product selects."""
    return {
        "failurePolicy": "Fail",
        "reinvocationPolicy": "IfNeeded",
        "matchConstraints": {"resourceRules": [_rule("", ["pods"], ["CREATE"])]},
        "variables": [
            _var("enforced", _ENFORCED),
            _var("labels", "object.metadata.?labels.orValue({})"),
            _var("selects", selects("variables.labels", "params.spec.selector")),
            _var("own", _operators_own_pod("object")),
        ],
        "mutations": [
            {
                "patchType": "ApplyConfiguration",
                "applyConfiguration": {
                    # Scheduling gates are a list map keyed by name: applying the gate twice (two
                    # products, or the seller's template already has it) leaves one.
                    "expression": (
                        "variables.enforced && variables.selects && !variables.own && "
                        f"!{_gated('object')} ? Object{{spec: Object.spec{{schedulingGates: "
                        f'[Object.spec.schedulingGates{{name: "{SCHEDULING_GATE}"}}]}}}} : Object{{}}'
                    )
                },
            }
        ],
    }


#: ValidatingAdmissionPolicies: suffix -> (fragment builder, MeteredProducts as params, matched on
#: the operator only). MutatingAdmissionPolicies: suffix -> builder (MeteredProducts as params).
VALIDATING: Final = {
    "pod-records": (pod_records, False, False),
    "workload-records": (workload_records, False, False),
    "cronjob-records": (cronjob_records, False, False),
    "product-pods": (product_pods, True, False),
    "operator": (operator_writes, False, True),
}
MUTATING: Final = {"gate": gate}
