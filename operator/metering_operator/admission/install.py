"""Local mode: apply the admission policies bound to whoever the operator runs as.

In a cluster the chart owns the policies. Run locally (``metering-operator run --webhook-url``
against any kubeconfig) the operator installs them itself, the way it writes its webhook
configuration, bound to the identity a SelfSubjectReview reports for its credentials.

Unlike the webhook configuration, the policies are left in force when the operator stops: they
are evaluated by the API server alone, need nothing from the operator process, and exist exactly
so that a stopped operator is not an open door. :func:`delete` (or ``kubectl delete
validatingadmissionpolicies,validatingadmissionpolicybindings,mutatingadmissionpolicies,
mutatingadmissionpolicybindings -l marketplace.metering.dev/policy-set=<prefix>``) removes a set.
"""

from __future__ import annotations

import logging
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from metering_operator.admission.objects import POLICY_SET_LABEL, Install, build

log = logging.getLogger(__name__)

_GROUP, _VERSION = "admissionregistration.k8s.io", "v1"
_PLURALS = {
    "ValidatingAdmissionPolicy": "validatingadmissionpolicies",
    "ValidatingAdmissionPolicyBinding": "validatingadmissionpolicybindings",
    "MutatingAdmissionPolicy": "mutatingadmissionpolicies",
    "MutatingAdmissionPolicyBinding": "mutatingadmissionpolicybindings",
}


def whoami(api: client.ApiClient) -> str:
    """The username the API server authenticates these credentials as (SelfSubjectReview)."""
    review = client.AuthenticationV1Api(api).create_self_subject_review(client.V1SelfSubjectReview())
    username: str = review.status.user_info.username
    return username


def served_kinds(api: client.ApiClient) -> set[str]:
    """Which admission policy kinds this API server serves at admissionregistration.k8s.io/v1."""
    resources = client.AdmissionregistrationV1Api(api).get_api_resources().resources
    by_plural = {plural: kind for kind, plural in _PLURALS.items()}
    return {by_plural[r.name] for r in resources if r.name in by_plural}


def apply(api: client.ApiClient, install: Install) -> list[str]:
    """Create or replace every object of ``install``; returns their ``Kind/name``."""
    custom = client.CustomObjectsApi(api)
    applied: list[str] = []
    for body in build(install):
        kind, name = body["kind"], body["metadata"]["name"]
        plural = _PLURALS[kind]
        try:
            current = custom.get_cluster_custom_object(_GROUP, _VERSION, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            custom.create_cluster_custom_object(_GROUP, _VERSION, plural, body)
        else:
            body = dict(
                body, metadata=dict(body["metadata"], resourceVersion=current["metadata"]["resourceVersion"])
            )
            custom.replace_cluster_custom_object(_GROUP, _VERSION, plural, name, body)
        applied.append(f"{kind}/{name}")
    return applied


def delete(api: client.ApiClient, prefix: str) -> list[str]:
    """Remove every policy object labelled with this install's prefix; returns what went."""
    custom = client.CustomObjectsApi(api)
    removed: list[str] = []
    # Bindings first: a binding without its policy is harmless, but tidier gone first.
    for kind in sorted(_PLURALS, key=lambda k: not k.endswith("Binding")):
        plural = _PLURALS[kind]
        try:
            items: list[dict[str, Any]] = custom.list_cluster_custom_object(
                _GROUP, _VERSION, plural, label_selector=f"{POLICY_SET_LABEL}={prefix}"
            )["items"]
        except ApiException as exc:
            if exc.status == 404:  # this server does not serve the kind
                continue
            raise
        for item in items:
            name = item["metadata"]["name"]
            try:
                custom.delete_cluster_custom_object(_GROUP, _VERSION, plural, name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            removed.append(f"{kind}/{name}")
    return removed
