"""Which AWS operations the operator's code calls, derived from the code and botocore's models.

The IAM policies the chart and docs publish, and the endpoints the chart points at the emulator,
must follow the code, not a list someone remembered to update. This reads the operator package's
source (the emulator excepted: it serves these operations, it does not call them), finds every
attribute reference whose name is a boto3 method of an AWS service the operator uses
(``client.checkout_license(...)``, ``call_aws(op, sts.assume_role_with_web_identity, ...)``), and
names each one as botocore does: the operation name (``CheckoutLicense``), the IAM action
(``<signing name>:<operation>``, e.g. ``license-manager:CheckoutLicense``) and the service id
behind boto3's ``AWS_ENDPOINT_URL_<SERVICE ID>`` variable.

The typed wrappers in ``aws/`` reach boto3 through ``getattr(client, "name")`` with a string, so a
wrapper nobody calls (``batch_meter_usage``, a SaaS operation) is not counted: only calls made from
the operator's own logic are.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import botocore
import botocore.session

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "operator" / "metering_operator"
#: Not the operator's calls: the emulator implements these operations for tests and the demo.
EXCLUDED = (PACKAGE / "emulator", PACKAGE / "emulator_clock.py")
#: botocore service names the operator talks to (its boto3 clients are created with these).
SERVICES = ("meteringmarketplace", "license-manager", "sts")


@dataclass(frozen=True, order=True)
class AwsCall:
    service: str  # botocore service name, e.g. license-manager
    operation: str  # e.g. CheckoutLicense
    signing_name: str  # IAM's service prefix, e.g. aws-marketplace for meteringmarketplace
    service_id: str  # e.g. "Marketplace Metering"
    where: str  # first module:line that references it

    @property
    def iam_action(self) -> str:
        return f"{self.signing_name}:{self.operation}"

    @property
    def endpoint_variable(self) -> str:
        """boto3's service-specific endpoint variable (AWS SDKs' "service-specific endpoints")."""
        return "AWS_ENDPOINT_URL_" + self.service_id.upper().replace(" ", "_")


@cache
def _methods() -> dict[str, tuple[str, str, str, str]]:
    """boto3 method name -> (service, operation, signing name, service id) for SERVICES."""
    session = botocore.session.get_session()
    methods: dict[str, tuple[str, str, str, str]] = {}
    for service in SERVICES:
        model = session.get_service_model(service)
        for operation in model.operation_names:
            methods[botocore.xform_name(operation)] = (
                service,
                operation,
                model.signing_name,
                model.service_id,
            )
    return methods


def _sources() -> list[Path]:
    return sorted(
        path for path in PACKAGE.rglob("*.py") if not any(path == ex or ex in path.parents for ex in EXCLUDED)
    )


@cache
def operator_aws_calls(under: str = "") -> tuple[AwsCall, ...]:
    """Every AWS operation the operator's code references, once each, sorted.

    ``under``: only the code in this file or folder of the package (e.g. ``gate/licensing.py``).
    """
    methods = _methods()
    found: dict[tuple[str, str], AwsCall] = {}
    scope = PACKAGE / under if under else PACKAGE
    for path in _sources():
        if path != scope and scope not in path.parents:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in methods:
                service, operation, signing, service_id = methods[node.attr]
                where = f"{path.relative_to(REPO)}:{node.lineno}"
                call = AwsCall(service, operation, signing, service_id, where)
                found.setdefault((service, operation), call)
    return tuple(sorted(found.values()))


def permission_calls(under: str = "") -> list[AwsCall]:
    """The calls an IAM permission policy must allow.

    ``sts:AssumeRoleWithWebIdentity`` is authorized by the role's trust policy (the IRSA subject),
    not by a permission policy; docs/install.md's trust policy names it.
    """
    return [call for call in operator_aws_calls(under) if call.service != "sts"]
