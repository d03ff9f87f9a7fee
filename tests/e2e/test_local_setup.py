"""The paths a newcomer walks from README.md, walked with the same commands.

* `make cluster` (``python -m devtools.cluster up``) writes a ready emulator configuration for the
  local cluster's issuer; `metering-operator emulator --config` with it accepts a pod's token.
* "Running the operator": ``python -m devtools.local_aws operator-identity`` gives the operator a web
  identity of its own, and unmodified boto3 (its web-identity provider, from the printed exports)
  gets credentials for the operator's role and calls MeterUsage with them.
* A metering-only product (entitlement.mode Off) needs no publicKeyVersion, and `kubectl get` of
  a product shows the Denied column.
* docs/install.md: a plain client-side `kubectl apply` of the CRD works (no --server-side needed).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from devtools.cluster import ClusterInfo
from devtools.local_aws import OPERATOR_ROLE
from devtools.stack import AWS_IDENTITY_VARIABLES
from kubernetes import client

from tests.emulator.harness import start_emulator

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CUSTOM_PRODUCT = "8s7ahzr2e3n4sv7d1u3hx8ykq"  # examples/emulator-config.yaml: dimension replicas


def _run(
    cluster: ClusterInfo, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **cluster.env(), "MMO_CLUSTER_STATE_DIR": str(cluster.state_dir), **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_make_cluster_writes_an_emulator_config_that_trusts_the_cluster(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    # Written when the cluster started (`make cluster`, or this session's fixture: the same start);
    # `emulator-config` rewrites it. (Not `devtools.cluster up` here: a cluster asked for on the
    # command line is marked as the user's, and this session would then leave it running.)
    config_path = cluster.state_dir / "emulator-config.yaml"
    assert config_path.is_file(), "the cluster's start writes the emulator configuration"
    rewrite = _run(
        cluster, "-m", "devtools.local_aws", "--state-dir", str(cluster.state_dir), "emulator-config"
    )
    assert rewrite.returncode == 0, rewrite.stderr
    assert rewrite.stdout.strip() == str(config_path)
    config = yaml.safe_load(config_path.read_text())
    assert config["issuers"][0] == {
        "issuer": cluster.issuer,
        "jwksUrl": cluster.jwks_uri,
        "caFile": str(cluster.ca_file),
    }

    # The operator's identity, as README "Running the operator" scripts it.
    token_file = tmp_path / "operator-token"
    ident = _run(
        cluster,
        "-m",
        "devtools.local_aws",
        "--state-dir",
        str(cluster.state_dir),
        "operator-identity",
        "--namespace",
        namespace,
        "--token-file",
        str(token_file),
    )
    assert ident.returncode == 0, ident.stderr
    exports = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in ident.stdout.splitlines()
    )
    assert exports == {"AWS_ROLE_ARN": OPERATOR_ROLE, "AWS_WEB_IDENTITY_TOKEN_FILE": str(token_file)}
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"

    emulator = start_emulator(config_path, tmp_path / "emulator")
    try:
        # Unmodified boto3 with only the environment README documents: its web-identity provider
        # calls the emulator's STS with the token file, then MeterUsage is signed with the result.
        hour = (datetime.now(UTC) - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
        script = (
            "import boto3, json, sys\n"
            "sts = boto3.client('sts')\n"
            "who = sts.get_caller_identity()['Arn']\n"
            "mp = boto3.client('meteringmarketplace')\n"
            f"r = mp.meter_usage(ProductCode='{EXAMPLE_CUSTOM_PRODUCT}', Timestamp='{hour.isoformat()}',"
            " UsageDimension='replicas', UsageQuantity=2)\n"
            "print(json.dumps({'arn': who, 'record': r['MeteringRecordId']}))\n"
        )
        env = {k: v for k, v in os.environ.items() if k not in AWS_IDENTITY_VARIABLES}
        env.update(exports)
        env.update(emulator.env())  # the endpoints and the config's Region
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert answer["arn"].startswith("arn:aws:sts::111122223333:assumed-role/metering-operator/"), answer
        [record] = emulator.admin.meter_records(EXAMPLE_CUSTOM_PRODUCT)
        assert record["meteringRecordId"] == answer["record"]
    finally:
        emulator.stop()


def _kubectl(cluster: ClusterInfo, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cluster.bin_dir / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_plain_client_side_apply_of_the_crd_works(cluster: ClusterInfo, kube: client.ApiClient) -> None:
    """docs/install.md: the CRD fits client-side apply's last-applied annotation (262144 bytes)."""
    crd_file = REPO / "manifests" / "crd" / "meteredproducts.yaml"
    done = _kubectl(cluster, "apply", "-f", str(crd_file))
    assert done.returncode == 0, done.stderr
    assert "meteredproducts.marketplace.metering.dev" in done.stdout
    crd = client.ApiextensionsV1Api(kube).read_custom_resource_definition(
        "meteredproducts.marketplace.metering.dev"
    )
    annotation = (crd.metadata.annotations or {}).get("kubectl.kubernetes.io/last-applied-configuration", "")
    assert annotation, "a client-side apply records the last-applied annotation"
    assert len(annotation) < 262144


def _product(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "marketplace.metering.dev/v1alpha1",
        "kind": "MeteredProduct",
        "metadata": {"name": name},
        "spec": spec,
    }


def test_metering_only_product_needs_no_key_version_and_get_shows_denials(
    cluster: ClusterInfo, kube: client.ApiClient, namespace: str, metered_product_crd: dict[str, Any]
) -> None:
    metering_only = _product(
        "metering-only",
        {
            "productCode": EXAMPLE_CUSTOM_PRODUCT,
            "selector": {"matchLabels": {"app": "metering-only"}},
            "entitlement": {"mode": "Off"},
            "metering": {"dimensions": [{"name": "replicas", "source": "Replicas"}]},
        },
    )
    created = _kubectl(cluster, "create", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(metering_only))
    assert created.returncode == 0, created.stderr
    # Entitlement on: the key version is still required, with a message naming the field.
    enforced = _product(
        "enforced",
        {
            "productCode": EXAMPLE_CUSTOM_PRODUCT,
            "publicKey": {"pem": "-----BEGIN PUBLIC KEY-----\nAA==\n-----END PUBLIC KEY-----\n"},
            "selector": {"matchLabels": {"app": "enforced"}},
            "entitlement": {"mode": "Enforce"},
        },
    )
    refused = _kubectl(cluster, "create", "-n", namespace, "-f", "-", stdin=yaml.safe_dump(enforced))
    assert refused.returncode != 0
    assert (
        "spec.publicKeyVersion: Required value: publicKeyVersion is required unless entitlement.mode is Off"
        in (refused.stderr)
    ), refused.stderr

    # `kubectl get mprod` has a Denied column (filled from status.pods.denied).
    client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
        "marketplace.metering.dev",
        "v1alpha1",
        namespace,
        "meteredproducts",
        "metering-only",
        {"status": {"pods": {"registered": 0, "pending": 0, "denied": 3}}},
    )
    table = _kubectl(cluster, "get", "mprod", "-n", namespace, "metering-only")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    columns = header.split()
    assert "DENIED" in columns, header
    assert row.split()[columns.index("DENIED")] == "3", table.stdout
