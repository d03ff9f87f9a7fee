"""The local "AWS account" for the local cluster: an emulator configuration and the operator's identity.

`make cluster` writes ``<state dir>/emulator-config.yaml`` (``.local/cluster/emulator-config.yaml``):
``examples/emulator-config.yaml`` with its IRSA OIDC provider replaced by the running cluster's
service-account issuer (its URL, JWKS URL and CA file) and every role trusting that issuer. Then:

    metering-operator emulator --config .local/cluster/emulator-config.yaml --port 4566

The operator needs an AWS identity of its own for MeterUsage and for `scope: Cluster`
registrations; on EKS that is IRSA on its ServiceAccount. Locally:

    eval "$(.venv/bin/python -m devtools.local_aws operator-identity --namespace shop)"

creates the ServiceAccount if needed, writes a token for it (audience ``sts.amazonaws.com``) to
``.local/operator-token`` and prints the ``AWS_ROLE_ARN`` / ``AWS_WEB_IDENTITY_TOKEN_FILE``
exports botocore's web-identity provider reads, for the role the emulator config defines.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from devtools.cluster import DEFAULT_STATE_DIR, REPO_ROOT, ClusterInfo, LocalCluster

EXAMPLE = REPO_ROOT / "examples" / "emulator-config.yaml"
#: The example's stand-in for an EKS cluster's OIDC provider; replaced by the local cluster's issuer.
EXAMPLE_ISSUER = "https://oidc.example.test/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
#: The operator's own role in the example configuration (trusted for any ServiceAccount named so).
OPERATOR_ROLE = "arn:aws:iam::111122223333:role/metering-operator"
OPERATOR_SERVICE_ACCOUNT = "metering-operator"
AUDIENCE = "sts.amazonaws.com"


def emulator_config(cluster: ClusterInfo, example: Path = EXAMPLE) -> dict[str, Any]:
    """The example configuration, trusting ``cluster``'s service-account issuer instead of the example's."""
    config: dict[str, Any] = copy.deepcopy(yaml.safe_load(example.read_text()))
    local = {"issuer": cluster.issuer, "jwksUrl": cluster.jwks_uri, "caFile": str(cluster.ca_file)}
    issuers = [i for i in config.get("issuers", []) if i.get("issuer") != EXAMPLE_ISSUER]
    # A JWKS file that only exists beside the example is of no use here.
    config["issuers"] = [local] + [i for i in issuers if "jwksFile" not in i]
    for role in config.get("roles", []):
        for trust in role.get("trust", []):
            if trust.get("issuer") == EXAMPLE_ISSUER:
                trust["issuer"] = cluster.issuer
    return config


def write_emulator_config(cluster: ClusterInfo) -> Path:
    path = cluster.state_dir / "emulator-config.yaml"
    header = (
        "# Written by `make cluster` (devtools/local_aws.py) from examples/emulator-config.yaml for\n"
        f"# the local cluster whose service-account issuer is {cluster.issuer}.\n"
        "# metering-operator emulator --config " + str(path) + "\n"
    )
    path.write_text(header + yaml.safe_dump(emulator_config(cluster), sort_keys=False))
    return path


def operator_identity(
    cluster: ClusterInfo,
    namespace: str,
    service_account: str = OPERATOR_SERVICE_ACCOUNT,
    role_arn: str = OPERATOR_ROLE,
    token_file: Path | None = None,
    hours: int = 12,
) -> dict[str, str]:
    """A web-identity token for the operator's ServiceAccount on the local cluster, and its env."""
    from kubernetes import client, config
    from kubernetes.client.rest import ApiException

    api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
    core = client.CoreV1Api(api)
    try:
        for kind, body in (
            ("namespace", {"metadata": {"name": namespace}}),
            ("serviceaccount", {"metadata": {"name": service_account, "namespace": namespace}}),
        ):
            try:
                if kind == "namespace":
                    core.create_namespace(body)
                else:
                    core.create_namespaced_service_account(namespace, body)
            except ApiException as exc:
                if exc.status != 409:  # already there
                    raise
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[AUDIENCE], expiration_seconds=hours * 3600)
        )
        token = core.create_namespaced_service_account_token(service_account, namespace, request).status.token
    finally:
        api.close()
    path = token_file or REPO_ROOT / ".local" / "operator-token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)  # a credential for the cluster's STS
    path.write_text(str(token) + "\n")
    return {"AWS_ROLE_ARN": role_arn, "AWS_WEB_IDENTITY_TOKEN_FILE": str(path.resolve())}


def _running(state_dir: Path) -> ClusterInfo:
    cluster = LocalCluster(state_dir)
    info = cluster.info()
    if info is None or not cluster.is_healthy():
        raise SystemExit("no running local cluster; run `make cluster` first")
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.local_aws", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("emulator-config", help="(re)write <state dir>/emulator-config.yaml; print its path")
    ident = sub.add_parser("operator-identity", help="mint the operator's web-identity token; print exports")
    ident.add_argument("--namespace", required=True, help="the namespace the operator runs in")
    ident.add_argument("--service-account", default=OPERATOR_SERVICE_ACCOUNT)
    ident.add_argument("--role-arn", default=OPERATOR_ROLE)
    ident.add_argument("--token-file", type=Path, default=None, help="default: .local/operator-token")
    args = parser.parse_args(argv)
    info = _running(args.state_dir)
    if args.command == "emulator-config":
        print(write_emulator_config(info))
        return 0
    env = operator_identity(info, args.namespace, args.service_account, args.role_arn, args.token_file)
    for key, value in env.items():
        print(f"export {key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
