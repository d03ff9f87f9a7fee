"""The chart rendered by the real Helm CLI (`helm lint`, `helm template`), no cluster needed.

Each test renders a values variant and checks the objects that matter for that value: security
settings, RBAC shape, webhook wiring and certificates, optional parts, and that bad values are
refused by values.schema.json with a message naming the value.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.chart.helmcli import CHART, Helm, HelmError, by_kind, one, strict_load_all

RELEASE = "mmo"
NAMESPACE = "metering-system"
FULLNAME = "mmo-marketplace-metering-operator"
# Offline rendering for 1.37 picks the MutatingAdmissionPolicy; the webhook tests ask for the webhook.
WEBHOOK = "admissionPolicies.gate=webhook"


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deployment = one(objects, "Deployment", FULLNAME)
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    container: dict[str, Any] = containers[0]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


# --- lint -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "set_values",
    [
        (),
        ("replicas=3", "metrics.serviceMonitor.enabled=true", "webhook.certificate.source=certManager"),
        ("watchNamespaces={a,b}", "emulator.enabled=true", "region=eu-west-1"),
        (
            "webhook.enabled=false",
            "rbac.create=false",
            "serviceAccount.create=false",
            "serviceAccount.name=x",
        ),
    ],
    ids=["defaults", "ha-certmanager-monitor", "namespaced-emulator", "minimal"],
)
def test_helm_lint_strict_passes(helm: Helm, set_values: tuple[str, ...]) -> None:
    args = ["lint", str(CHART), "--strict"]
    for item in set_values:
        args += ["--set", item]
    result = helm.run(*args)
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    "set_values",
    [
        (),
        ("replicas=3", "metrics.serviceMonitor.enabled=true", "webhook.certificate.source=certManager"),
        ("watchNamespaces={a,b}", "emulator.enabled=true", "region=eu-west-1", "podLabels.team=x"),
    ],
    ids=["defaults", "ha-certmanager-monitor", "namespaced-emulator"],
)
def test_rendered_yaml_has_no_duplicate_keys(helm: Helm, set_values: tuple[str, ...]) -> None:
    # The API server keeps the last of duplicated keys without a word; catch them here.
    objects = strict_load_all(helm.template(set_values=set_values).stdout)
    assert objects


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_render_the_expected_objects(helm: Helm) -> None:
    """Namespaced (the release namespace), admission policies with the gate added by a
    MutatingAdmissionPolicy (offline rendering for 1.37), MeteredProduct write not in `edit`."""
    objects = helm.render(release=RELEASE, namespace=NAMESPACE)
    kinds = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    policies = [
        "pod-records",
        "workload-records",
        "cronjob-records",
        "product-pods",
        "operator",
    ]
    assert kinds == sorted(
        [
            f"ClusterRole/{FULLNAME}-cluster",
            f"ClusterRole/{FULLNAME}-view",
            f"ClusterRoleBinding/{FULLNAME}-cluster",
            f"Deployment/{FULLNAME}",
            f"Role/{FULLNAME}",
            f"RoleBinding/{FULLNAME}",
            f"Role/{FULLNAME}-leader-election",
            f"RoleBinding/{FULLNAME}-leader-election",
            f"Service/{FULLNAME}-metrics",
            f"ServiceAccount/{FULLNAME}",
            *[
                f"{kind}/{FULLNAME}-{p}"
                for p in policies
                for kind in ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
            ],
            f"MutatingAdmissionPolicy/{FULLNAME}-gate",
            f"MutatingAdmissionPolicyBinding/{FULLNAME}-gate",
        ]
    ), (
        "no webhook, no PDB with one replica, no ServiceMonitor, no emulator, no write aggregation "
        "unless asked"
    )
    cluster_scoped = ("ClusterRole", "ClusterRoleBinding")
    for obj in objects:
        if obj["kind"] not in cluster_scoped and "AdmissionPolicy" not in obj["kind"]:
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]["name"]
    assert one(objects, "Role", FULLNAME)["metadata"]["namespace"] == NAMESPACE
    assert "--namespace=" + NAMESPACE in operator_container(objects)["args"]
    assert "--no-webhook" in operator_container(objects)["args"]


def test_operator_pod_is_locked_down(helm: Helm) -> None:
    objects = helm.render(release=RELEASE, namespace=NAMESPACE)
    pod = one(objects, "Deployment", FULLNAME)["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert isinstance(pod["securityContext"]["runAsUser"], int)
    assert pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts["/tmp"] == "tmp"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["tmp"]
    assert "hostPath" not in str(volumes)
    assert "resources" in container
    assert container["resources"]["limits"]["memory"]


def test_probes_use_the_health_port(helm: Helm) -> None:
    container = operator_container(helm.render(set_values=["health.port=9090", "health.path=/live"]))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 9090
    assert "--health-port=9090" in container["args"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/live", "port": "health"}


def test_image_defaults_to_app_version_and_can_pin_a_digest(helm: Helm) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    container = operator_container(helm.render())
    assert container["image"] == f"marketplace-metering-operator:{chart['appVersion']}"
    digest = "sha256:" + "a" * 64
    container = operator_container(helm.render(set_values=[f"image.digest={digest}", "image.repository=r/x"]))
    assert container["image"] == f"r/x@{digest}"


# --- operator flags ---------------------------------------------------------------------------


def test_values_become_operator_flags(helm: Helm) -> None:
    container = operator_container(
        helm.render(
            values={
                "region": "eu-central-1",
                "trustedProductCodes": ["1fszvu527waovqeuhpkyx2b5d", "abc123"],
                "watchNamespaces": ["shop", "billing"],
                "logFormat": "text",
                "ungatedPodAction": "Report",
                "metrics": {"port": 9100},
                "webhook": {"port": 10250},
                "admissionPolicies": {"gate": "webhook"},
            }
        )
    )
    args = container["args"]
    assert args[0] == "run", "args replace the image CMD, so they must start with the subcommand"
    for flag in (
        "--namespace=shop",
        "--namespace=billing",
        "--trusted-product-code=1fszvu527waovqeuhpkyx2b5d",
        "--trusted-product-code=abc123",
        "--region=eu-central-1",
        "--log-format=text",
        "--ungated-pod-action=Report",
        "--metrics-port=9100",
        "--webhook-port=10250",
        "--webhook-cert-dir=/etc/metering-operator/webhook-tls",
    ):
        assert flag in args
    env = env_of(container)
    assert env["AWS_REGION"] == env["AWS_DEFAULT_REGION"] == "eu-central-1"
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_no_region_is_invented(helm: Helm) -> None:
    container = operator_container(helm.render())
    assert not any(a.startswith("--region") for a in container["args"])
    assert "AWS_REGION" not in env_of(container)
    assert "AWS_DEFAULT_REGION" not in env_of(container)


def test_rendered_flags_are_accepted_by_the_operator(helm: Helm) -> None:
    """The chart and `metering-operator run` agree on every flag (parsed by the real CLI parser)."""
    from metering_operator.cli import build_parser
    from metering_operator.kube.webhook import WEBHOOK_NAME, WEBHOOK_PATH

    objects = helm.render(
        values={
            "region": "us-east-1",
            "trustedProductCodes": ["1fszvu527waovqeuhpkyx2b5d"],
            "watchNamespaces": ["shop", "billing"],
            "logFormat": "json",
            "metrics": {"port": 9100},
            "health": {"port": 9101},
            "webhook": {"port": 9443},
            "admissionPolicies": {"gate": "webhook"},
        }
    )
    args = build_parser().parse_args(operator_container(objects)["args"])
    assert args.command == "run"
    assert args.namespaces == ["shop", "billing"]
    assert args.trusted_product_codes == ["1fszvu527waovqeuhpkyx2b5d"]
    assert args.region == "us-east-1"
    assert args.log_format == "json"
    assert args.ungated_pod_action == "Evict"  # the chart's default, accepted by the CLI
    assert (args.metrics_port, args.health_port, args.webhook_port) == (9100, 9101, 9443)
    assert args.webhook_cert_dir == "/etc/metering-operator/webhook-tls"
    assert args.no_webhook is False
    assert args.webhook_url is None, "in a cluster the chart owns the webhook configuration"
    # The Service path is the one kopf serves the operator's gate handler under.
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["clientConfig"]["service"]["path"] == WEBHOOK_PATH
    assert webhook["name"] == WEBHOOK_NAME

    for no_webhook in (
        ["webhook.enabled=false", "admissionPolicies.gate=webhook"],
        ["admissionPolicies.gate=policy"],
    ):
        rendered = helm.render(set_values=no_webhook)
        assert build_parser().parse_args(operator_container(rendered)["args"]).no_webhook is True


# --- IRSA -------------------------------------------------------------------------------------


def test_role_arn_annotates_the_service_account(helm: Helm) -> None:
    arn = "arn:aws:iam::111122223333:role/marketplace-metering"
    objects = helm.render(set_values=[f"serviceAccount.roleArn={arn}"])
    sa = one(objects, "ServiceAccount", FULLNAME)
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == arn
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == FULLNAME
    assert "AWS_ROLE_ARN" not in env_of(operator_container(objects)), "on EKS the webhook injects it"


def test_web_identity_token_injection_mimics_eks(helm: Helm) -> None:
    arn = "arn:aws:iam::111122223333:role/m"
    objects = helm.render(set_values=[f"serviceAccount.roleArn={arn}", "webIdentityToken.inject=true"])
    container = operator_container(objects)
    env = env_of(container)
    assert env["AWS_ROLE_ARN"] == arn
    token_file = env["AWS_WEB_IDENTITY_TOKEN_FILE"]
    mount = next(m for m in container["volumeMounts"] if token_file.startswith(m["mountPath"] + "/"))
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    source = volume["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "sts.amazonaws.com"
    assert token_file.endswith("/" + source["path"])


# --- RBAC -------------------------------------------------------------------------------------

FORBIDDEN_RESOURCES = {
    "secrets",
    "nodes",
    "clusterroles",
    "clusterrolebindings",
    "roles",
    "rolebindings",
    "mutatingwebhookconfigurations",
    "validatingwebhookconfigurations",
    "pods/exec",
    "pods/status",
    "pods/log",
    "users",
    "groups",
}
FORBIDDEN_VERBS = {"*", "delete", "deletecollection", "escalate", "bind", "impersonate"}


def rbac_rules(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        rule
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
        for rule in o["rules"]
        if not o["metadata"]["name"].endswith(("-view", "-edit"))
    ]


@pytest.mark.parametrize(
    "set_values",
    [(), ("watchNamespaces={a,b}",), ("watch.mode=cluster",)],
    ids=["namespaced", "list", "cluster-wide"],
)
def test_operator_rbac_has_no_dangerous_rules(helm: Helm, set_values: tuple[str, ...]) -> None:
    objects = helm.render(set_values=set_values)
    # One delete exists: the sweep of the operator's own records (denials, journals, seat records),
    # in a Role of its own namespace only, narrowed by the -operator policy to labelled ConfigMaps.
    own = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"].endswith("-leader-election")]
    assert len(own) == 1
    deleting = [
        r
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
        for r in o["rules"]
        if "delete" in r["verbs"]
    ]
    assert deleting == [r for r in own[0]["rules"] if "delete" in r["verbs"]]
    assert [r["resources"] for r in deleting] == [["configmaps"]], deleting
    for rule in rbac_rules(objects):
        verbs = set(rule["verbs"]) - ({"delete"} if rule in deleting else set())
        assert not verbs & FORBIDDEN_VERBS, rule
        assert not set(rule["resources"]) & FORBIDDEN_RESOURCES, rule
        assert "*" not in rule["resources"], rule
        assert "*" not in rule["apiGroups"], rule
        if "pods" in rule["resources"]:
            assert set(rule["verbs"]) == {"get", "list", "watch", "patch"}, "never create or delete pods"
        if "pods/eviction" in rule["resources"]:
            # Enforce evicts a pod that runs without a grant: create on the Eviction API, alone.
            assert (rule["resources"], rule["verbs"]) == (["pods/eviction"], ["create"]), rule


def test_watch_namespaces_gives_one_role_per_namespace(helm: Helm) -> None:
    objects = helm.render(
        release=RELEASE,
        namespace=NAMESPACE,
        set_values=["watchNamespaces={shop,billing}", "admissionPolicies.gate=webhook"],
    )
    roles = {(r["metadata"]["namespace"], r["metadata"]["name"]) for r in by_kind(objects, "Role")}
    assert roles == {("shop", FULLNAME), ("billing", FULLNAME), (NAMESPACE, f"{FULLNAME}-leader-election")}
    for binding in by_kind(objects, "RoleBinding"):
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    cluster_roles = {r["metadata"]["name"] for r in by_kind(objects, "ClusterRole")}
    assert FULLNAME not in cluster_roles, "no cluster-wide access to pods when namespaces are listed"
    cluster_rules = one(objects, "ClusterRole", f"{FULLNAME}-cluster")["rules"]
    assert {r for rule in cluster_rules for r in rule["resources"]} == {
        "customresourcedefinitions",
        "namespaces",
    }
    webhook = one(objects, "MutatingWebhookConfiguration")["webhooks"][0]
    watched = [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["billing", "shop"]}]
    assert webhook["namespaceSelector"]["matchExpressions"] == watched
    binding = one(objects, "ValidatingAdmissionPolicyBinding", f"{FULLNAME}-product-pods")
    assert binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"] == watched


def test_rbac_can_be_left_to_the_user(helm: Helm) -> None:
    objects = helm.render(set_values=["rbac.create=false"])
    assert not [o for o in objects if o["apiVersion"].startswith("rbac.authorization.k8s.io")]


# --- webhook ----------------------------------------------------------------------------------


def _load_pem(b64: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(b64))


def test_chart_generated_webhook_certificate_is_signed_by_the_ca_bundle(helm: Helm) -> None:
    objects = helm.render(release=RELEASE, namespace=NAMESPACE, set_values=[WEBHOOK])
    webhook_config = one(objects, "MutatingWebhookConfiguration", FULLNAME)
    (webhook,) = webhook_config["webhooks"]
    secret = one(objects, "Secret", f"{FULLNAME}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    ca = _load_pem(webhook["clientConfig"]["caBundle"])
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    leaf = _load_pem(secret["data"]["tls.crt"])
    public_key = ca.public_key()
    assert leaf.issuer == ca.subject
    assert leaf.signature_hash_algorithm is not None
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(
            leaf.signature, leaf.tbs_certificate_bytes, padding.PKCS1v15(), leaf.signature_hash_algorithm
        )
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        public_key.verify(leaf.signature, leaf.tbs_certificate_bytes, ec.ECDSA(leaf.signature_hash_algorithm))
    service = webhook["clientConfig"]["service"]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert f"{service['name']}.{service['namespace']}.svc" in names, "the API server dials <svc>.<ns>.svc"
    assert not [n for n in names if isinstance(n, ipaddress.IPv4Address)]
    assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=365)
    one(objects, "Service", service["name"])


def test_webhook_wiring(helm: Helm) -> None:
    objects = helm.render(
        release=RELEASE,
        namespace=NAMESPACE,
        set_values=["webhook.failurePolicy=Fail", "webhook.path=/mutate", WEBHOOK],
    )
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["failurePolicy"] == "Fail"
    assert webhook["sideEffects"] == "None"
    assert webhook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "Namespaced",
        }
    ]
    service_ref = webhook["clientConfig"]["service"]
    assert service_ref["path"] == "/mutate"
    service = one(objects, "Service", service_ref["name"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == service_ref["port"]
    container = operator_container(objects)
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    deployment = one(objects, "Deployment")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    # No exemption by a label anyone can set (the old part-of exemption is gone); the webhook sees
    # the watched namespaces only (by default the release namespace).
    assert "objectSelector" not in webhook
    assert webhook["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": [NAMESPACE]}
    ]


def test_webhook_selectors_can_be_overridden(helm: Helm) -> None:
    objects = helm.render(
        values={
            "webhook": {
                "namespaceSelector": {"matchLabels": {"metered": "yes"}},
                "objectSelector": {"matchLabels": {"app": "product"}},
            },
            "admissionPolicies": {"gate": "webhook"},
        }
    )
    (webhook,) = one(objects, "MutatingWebhookConfiguration")["webhooks"]
    assert webhook["namespaceSelector"] == {"matchLabels": {"metered": "yes"}}
    assert webhook["objectSelector"] == {"matchLabels": {"app": "product"}}


def test_cert_manager_certificates(helm: Helm) -> None:
    objects = helm.render(
        release=RELEASE, namespace=NAMESPACE, set_values=["webhook.certificate.source=certManager", WEBHOOK]
    )
    assert not by_kind(objects, "Secret"), "cert-manager writes the Secret"
    cert = one(objects, "Certificate")
    webhook_config = one(objects, "MutatingWebhookConfiguration")
    assert webhook_config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{NAMESPACE}/{cert['metadata']['name']}"
    )
    assert "caBundle" not in webhook_config["webhooks"][0]["clientConfig"], "cainjector fills it"
    assert cert["spec"]["issuerRef"]["name"] == one(objects, "Issuer")["metadata"]["name"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {
        "name": "webhook-tls",
        "secret": {"secretName": cert["spec"]["secretName"], "defaultMode": 0o440},
    } in (pod["volumes"])
    service = webhook_config["webhooks"][0]["clientConfig"]["service"]
    assert f"{service['name']}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]

    objects = helm.render(
        values={
            "webhook": {
                "certificate": {
                    "source": "certManager",
                    "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}},
                }
            },
            "admissionPolicies": {"gate": "webhook"},
        }
    )
    assert not by_kind(objects, "Issuer")
    assert one(objects, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


@pytest.mark.parametrize(
    "set_values",
    [("webhook.enabled=false", WEBHOOK), ("admissionPolicies.gate=policy",), ()],
    ids=["webhook-disabled", "policy", "auto-on-1.37"],
)
def test_no_webhook_renders_no_webhook_parts(helm: Helm, set_values: tuple[str, ...]) -> None:
    objects = helm.render(set_values=set_values)
    assert not by_kind(objects, "MutatingWebhookConfiguration")
    assert not by_kind(objects, "Secret")
    container = operator_container(objects)
    assert not [a for a in container["args"] if a.startswith("--webhook")]
    assert "--no-webhook" in container["args"]
    assert "webhook" not in {p["name"] for p in container["ports"]}


# --- optional parts ---------------------------------------------------------------------------


def test_pdb_only_with_more_than_one_replica(helm: Helm) -> None:
    assert not by_kind(helm.render(set_values=["replicas=1"]), "PodDisruptionBudget")
    objects = helm.render(set_values=["replicas=2"])
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    deployment = one(objects, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_service_monitor_scrapes_the_metrics_service(helm: Helm) -> None:
    objects = helm.render(
        set_values=["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.labels.release=prom"]
    )
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service", f"{FULLNAME}-metrics")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    container = operator_container(objects)
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in container["ports"]


def test_emulator_is_wired_to_the_operator(helm: Helm) -> None:
    config = {"region": "eu-west-1", "products": [{"productCode": "abc"}]}
    objects = helm.render(
        release=RELEASE,
        namespace=NAMESPACE,
        values={"emulator": {"enabled": True, "port": 9000, "config": config}},
    )
    name = f"{FULLNAME}-emulator"
    configmap = one(objects, "ConfigMap", name)
    assert yaml.safe_load(configmap["data"]["config.yaml"]) == config
    service = one(objects, "Service", name)
    emulator = one(objects, "Deployment", name)
    pod = emulator["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "emulator"
    assert "--port=9000" in container["args"]
    assert "--host=0.0.0.0" in container["args"]
    assert service["spec"]["selector"].items() <= emulator["spec"]["template"]["metadata"]["labels"].items()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = env_of(operator_container(objects))
    url = f"http://{name}.{NAMESPACE}.svc:9000"
    # Every AWS service the operator calls (Metering, License Manager for contract products, STS
    # for IRSA) goes to the emulator: one forgotten service would reach real AWS from a test cluster.
    endpoints = {name: value for name, value in env.items() if name.startswith("AWS_ENDPOINT_URL")}
    assert endpoints == {
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url,
        "AWS_ENDPOINT_URL_LICENSE_MANAGER": url,
        "AWS_ENDPOINT_URL_STS": url,
    }
    assert service["spec"]["ports"][0]["port"] == 9000
    # Without the emulator the operator talks to AWS.
    assert not [name for name in env_of(operator_container(helm.render())) if name.startswith("AWS_ENDPOINT")]


# --- bad values -------------------------------------------------------------------------------

BAD_VALUES = [
    # (--set or values, a fragment the error must contain)
    ("replicas=0", "/replicas"),
    ("replicas=two", "/replicas"),
    ("replica=2", "replica"),
    ("logFormat=xml", "/logFormat"),
    ("ungatedPodAction=Delete", "/ungatedPodAction"),
    ("region=EU-WEST-1", "/region"),
    ("region=eu_west_1", "/region"),
    ("serviceAccount.roleArn=my-role", "/serviceAccount/roleArn"),
    ("trustedProductCodes={bad code!}", "/trustedProductCodes/0"),
    ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
    ("webhook.failurePolicy=Sometimes", "/webhook/failurePolicy"),
    ("webhook.timeoutSeconds=60", "/webhook/timeoutSeconds"),
    ("webhook.certificate.source=vault", "/webhook/certificate/source"),
    ("metrics.port=70000", "/metrics/port"),
    ("image.digest=latest", "/image/digest"),
    ("securityContext.runAsNonRoot=false", "/securityContext/runAsNonRoot"),
    ("securityContext.allowPrivilegeEscalation=true", "/securityContext/allowPrivilegeEscalation"),
    ("podSecurityContext.runAsUser=0", "/podSecurityContext/runAsUser"),
    ("webIdentityToken.inject=true", "/serviceAccount"),
    ("emulator.enabled=yes", "/emulator/enabled"),
]


@pytest.mark.parametrize(("set_value", "fragment"), BAD_VALUES, ids=[v for v, _ in BAD_VALUES])
def test_bad_values_are_refused_by_the_schema(helm: Helm, set_value: str, fragment: str) -> None:
    setter = "--set-string" if set_value.endswith("=yes") else "--set"
    result = helm.run("template", "mmo", str(CHART), setter, set_value, check=False)
    assert result.returncode != 0, f"{set_value} was accepted"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert fragment in result.stderr, result.stderr


def test_schema_covers_every_default_value(helm: Helm) -> None:
    """Every key in values.yaml is described by the schema (so additionalProperties catches typos)."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and node.get("properties") is not None:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "")
    with pytest.raises(HelmError):
        helm.template(values={"webhook": {"portt": 1}})


def test_documented_kind_values_install_cleanly(helm: Helm, tmp_path: Path) -> None:
    """docs/install.md's kind values pass the chart's schema and the emulator's own config model."""
    from metering_operator.emulator.config import EmulatorConfig

    text = (CHART.parents[1] / "docs" / "install.md").read_text()
    start = text.index("cat > kind-values.yaml <<'EOF'\n") + len("cat > kind-values.yaml <<'EOF'\n")
    values_text = text[start : text.index("\nEOF\n", start)]
    values_file = tmp_path / "kind-values.yaml"
    values_file.write_text(values_text)
    objects = [
        doc for doc in yaml.safe_load_all(helm.template(extra=["--values", str(values_file)]).stdout) if doc
    ]
    values = yaml.safe_load(values_text)
    config = EmulatorConfig.model_validate(values["emulator"]["config"])
    env = env_of(operator_container(objects))
    assert config.region == values["region"] == env["AWS_REGION"], "operator and emulator agree on the Region"
    assert env["AWS_ROLE_ARN"] in {role.arn for role in config.roles}
    assert set(values["trustedProductCodes"]) <= {p.product_code for p in config.products}
    # The docs apply the sample MeteredProduct: the emulator must know its code and dimensions.
    sample = yaml.safe_load((CHART.parents[1] / "manifests" / "samples" / "meteredproduct.yaml").read_text())
    product = next(p for p in config.products if p.product_code == sample["spec"]["productCode"])
    assert {d["name"] for d in sample["spec"]["metering"]["dimensions"]} <= product.dimension_names()
