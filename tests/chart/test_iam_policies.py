"""The IAM policies the chart ships (files/iam/) and the docs print follow the operator's code.

The action lists are derived from the code (tests/chart/aws_calls.py: every boto3 operation the
operator package references, named by botocore's models), never copied: a new AWS call without its
permission, or a documented permission nothing calls any more, fails here. Each policy is valid
JSON of IAM's policy grammar as used here, and every copy in the docs and the chart's NOTES is the
file itself.
"""

from __future__ import annotations

import json
import re
from typing import Any

import botocore
import pytest

from tests.chart.aws_calls import REPO, AwsCall, operator_aws_calls, permission_calls
from tests.chart.helmcli import CHART, Helm

IAM_DIR = CHART / "files" / "iam"
ALL = "all.json"
#: Where policies are printed: each ```json block after a `<!-- iam: NAME -->` marker is that file.
DOCS = {
    "docs/pricing-models.md": {"register-usage.json", "meter-usage.json", "license-manager.json", ALL},
    "docs/install.md": {ALL},
    "charts/marketplace-metering-operator/README.md": {ALL},
}
MARKED_BLOCK = re.compile(r"<!-- iam: (?P<name>[\w.-]+) -->\s*```json\n(?P<body>.*?)```", re.S)


def policy_files() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(IAM_DIR.glob("*.json"))}


def actions(policy: dict[str, Any]) -> list[str]:
    return [action for statement in policy["Statement"] for action in statement["Action"]]


def file_for(call: AwsCall) -> str:
    """Which capability file must allow a call: one per Metering operation, one for License Manager."""
    if call.service == "license-manager":
        return "license-manager.json"
    return str(botocore.xform_name(call.operation)).replace("_", "-") + ".json"


def test_the_code_calls_what_the_policies_are_about() -> None:
    # Guards the derivation itself: if the scan found nothing, every comparison below would be moot.
    services = {call.service for call in operator_aws_calls()}
    assert {"meteringmarketplace", "sts"} <= services, operator_aws_calls()
    assert "aws-marketplace:RegisterUsage" in {c.iam_action for c in permission_calls()}


@pytest.mark.parametrize("name", sorted(policy_files()))
def test_each_policy_is_a_valid_allow_only_policy(name: str) -> None:
    policy = policy_files()[name]
    assert set(policy) == {"Version", "Statement"}, name
    assert policy["Version"] == "2012-10-17"
    sids = [statement["Sid"] for statement in policy["Statement"]]
    assert len(sids) == len(set(sids)), sids
    assert all(re.fullmatch(r"[A-Za-z0-9]+", sid) for sid in sids), sids
    for statement in policy["Statement"]:
        assert set(statement) == {"Sid", "Effect", "Action", "Resource"}, statement
        assert statement["Effect"] == "Allow"
        # Neither Metering nor License Manager's consumption calls take resource-level permissions.
        assert statement["Resource"] == "*"
        assert statement["Action"], statement
        assert all(re.fullmatch(r"[a-z-]+:[A-Za-z]+", action) for action in statement["Action"]), statement
    listed = actions(policy)
    assert len(listed) == len(set(listed)), f"{name} lists an action twice: {listed}"
    assert not [a for a in listed if "*" in a], "wildcards grant more than the operator calls"


def test_all_json_allows_exactly_what_the_operator_calls() -> None:
    derived = sorted(call.iam_action for call in permission_calls())
    assert sorted(actions(policy_files()[ALL])) == derived, (
        "files/iam/all.json must name exactly the actions the code calls; found in the code:\n"
        + "\n".join(f"  {c.iam_action}  ({c.where})" for c in permission_calls())
    )


def test_capability_policies_split_all_json_by_operation() -> None:
    files = policy_files()
    expected: dict[str, set[str]] = {}
    for call in permission_calls():
        expected.setdefault(file_for(call), set()).add(call.iam_action)
    capability = {name: set(actions(policy)) for name, policy in files.items() if name != ALL}
    assert capability == expected
    # all.json is the capability statements together, for one role serving every product.
    together = [s for name in sorted(capability) for s in files[name]["Statement"]]
    assert sorted(files[ALL]["Statement"], key=lambda s: s["Sid"]) == sorted(together, key=lambda s: s["Sid"])


#: Where each pricing model's AWS calls are made (the code, read by aws_calls): its entitlement
#: call and, for metered models, the metering services. The actions are derived from these files.
MODEL_CODE = {
    "free": (),
    "hourly": ("gate/registrar.py",),
    "custom metering": ("metering",),
    "contract": ("gate/licensing.py",),
    "contract with consumption": ("gate/licensing.py", "metering"),
}
IAM_TABLE = re.compile(r"^\| model \| the pods' role \(scope `Pod`\) \|.*?\n\| --- .*?\n((?:\|.*\n)+)", re.M)


def model_table() -> dict[str, tuple[set[str], set[str], set[str]]]:
    """docs/pricing-models.md's IAM table: model -> (pods' role, operator scope Pod, operator
    scope Cluster), each the union of the actions of the policy files its cell names."""
    match = IAM_TABLE.search((REPO / "docs" / "pricing-models.md").read_text())
    assert match, "docs/pricing-models.md has no IAM table by model"
    files = policy_files()
    table: dict[str, tuple[set[str], set[str], set[str]]] = {}
    for line in match.group(1).strip().splitlines():
        model, *cells = [c.strip() for c in line.strip("|").split("|")]
        roles = []
        for cell in cells:
            names = re.findall(r"`([\w.-]+\.json)`", cell)
            assert names or cell == "none", f"{model}: {cell!r} names no policy file"
            assert set(names) <= set(files), f"{model}: {cell!r} names a file files/iam/ lacks"
            roles.append({a for n in names for a in actions(files[n])})
        table[model] = (roles[0], roles[1], roles[2])
    return table


def test_each_models_policies_allow_exactly_its_calls() -> None:
    table = model_table()
    assert set(table) == set(MODEL_CODE)
    covered: set[str] = set()
    for model, places in MODEL_CODE.items():
        calls = {c.iam_action for place in places for c in permission_calls(place)}
        covered |= calls
        pods, operator_pod_scope, operator_cluster_scope = table[model]
        # Scope Pod: the pods' and the operator's roles together; scope Cluster: the operator alone.
        assert pods | operator_pod_scope == calls, (model, sorted(calls))
        assert operator_cluster_scope == calls, (model, sorted(calls))
        # The pods only ever call the entitlement operations, never MeterUsage.
        assert "aws-marketplace:MeterUsage" not in pods, model
    # Every call of the operator belongs to some model's code: a call elsewhere needs a row.
    assert covered == {c.iam_action for c in permission_calls()}


@pytest.mark.parametrize("doc", sorted(DOCS))
def test_docs_print_the_policy_files_verbatim(doc: str) -> None:
    text = (REPO / doc).read_text()
    blocks = [(m["name"], m["body"]) for m in MARKED_BLOCK.finditer(text)]
    files = policy_files()
    for name, body in blocks:
        assert name in files, f"{doc} marks a policy {name} that files/iam/ does not have"
        assert json.loads(body) == files[name], f"{doc}: the {name} block differs from files/iam/{name}"
    assert {name for name, _ in blocks} >= DOCS[doc], f"{doc} should print {sorted(DOCS[doc])}"
    # Every JSON block naming an IAM action is one of the marked copies: no stale hand-written policy.
    marked = {body for _, body in blocks}
    for other in re.findall(r"```json\n(.*?)```", text, re.S):
        if re.search(r'"(aws-marketplace|license-manager):', other):
            assert other in marked, f"{doc} has an unmarked IAM policy:\n{other}"


def test_install_trust_policy_names_the_web_identity_login() -> None:
    # AssumeRoleWithWebIdentity is the one STS call; the role's trust policy authorizes it.
    sts = [c for c in operator_aws_calls() if c.service == "sts"]
    assert [c.operation for c in sts] == ["AssumeRoleWithWebIdentity"]
    assert '"Action": "sts:AssumeRoleWithWebIdentity"' in (REPO / "docs" / "install.md").read_text()


@pytest.mark.cluster
def test_notes_print_the_operator_policy_and_name_the_files(cluster_helm: Helm) -> None:
    notes = cluster_helm.notes()
    start = notes.index("all of them:") + len("all of them:")
    printed, _ = json.JSONDecoder().raw_decode(notes[start:].lstrip())
    assert printed == policy_files()[ALL], notes
    for name in policy_files():
        assert f"files/iam/{name}" in notes
