"""The admission webhook's plumbing: serving certificates, kopf's server, the webhook configuration.

Two deployments, one code path:

* In a cluster the chart renders a MutatingWebhookConfiguration with a Service reference and a
  CA, and mounts the serving key pair; the operator serves with ``--webhook-cert-dir`` and does
  not touch the configuration.
* Locally (the API server on 127.0.0.1 calling the operator by URL) the operator generates a
  throw-away CA and serving certificate for the URL's host, and creates or updates the
  configuration itself (``--webhook-url``), with that CA as ``caBundle``.

Failure policy: ``Ignore``. An operator that is down, restarting or being upgraded must not
block every pod creation in the watched namespaces (its own replacement pod included). The
consequence is handled by the product watch: a pod created while the webhook was unreachable
still matches the product's selector, is found, registered, and reported (a Warning Event and
the Entitled condition); sellers who need a hard guarantee write the gate into the pod template.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp.web
import kopf
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger(__name__)

#: kopf serves each admission handler under ``/<handler id>``; the chart's Service path uses it.
HANDLER_ID = "gate-pods"
WEBHOOK_PATH = f"/{HANDLER_ID}"
WEBHOOK_NAME = "gate.marketplace.metering.dev"
TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class ServingCerts:
    ca_pem: bytes
    cert_file: Path
    key_file: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def generate_serving_certs(directory: Path, hosts: list[str], *, days: int = 365) -> ServingCerts:
    """A self-signed CA and a serving certificate for ``hosts`` (DNS names or IP addresses)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC) - timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("marketplace-metering-operator webhook CA"))
        .issuer_name(_name("marketplace-metering-operator webhook CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = directory / "tls.crt", directory / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_file.chmod(0o600)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    (directory / "ca.crt").write_bytes(ca_pem)
    return ServingCerts(ca_pem, cert_file, key_file)


JsonPatch = list[dict[str, Any]]
#: A direct admission handler: the AdmissionReview's ``request`` in, JSON-patch ops (or None) out.
#: It must not raise and it always admits (the gate's webhook never refuses a pod).
DirectAdmission = Callable[[Mapping[str, Any]], JsonPatch | None]


class AdmissionServer(kopf.WebhookServer):
    """kopf's webhook server (TLS, certificates, listening) with a direct path per handler id.

    kopf serves every admission request through its handler machinery: it wraps the object in
    its body and diff structures, runs the handler with its full set of keyword arguments, logs
    "succeeded" per request, deep-copies the pod and diffs it against the patched copy with
    ``jsonpatch`` to build the answer. On one event loop shared with kopf's watches, that was
    about a third of the operator's Python CPU per gated pod (py-spy, bench/results). A handler
    registered in :attr:`direct` is answered here instead: parse, decide, answer with the ops it
    returns; any other id still goes through kopf (``_serve`` is kopf 1.45's per-request hook).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.direct: dict[str, DirectAdmission] = {}

    async def _serve(self, fn: Any, request: aiohttp.web.Request) -> aiohttp.web.Response:  # type: ignore[override]
        direct = self.direct.get(str(request.match_info.get("id", "")))
        if direct is None:
            response: aiohttp.web.Response = await super()._serve(fn, request)
            return response
        try:
            review = json.loads(await request.read())
            payload = review["request"]
            uid = str(payload["uid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise aiohttp.web.HTTPBadRequest(reason=f"not an AdmissionReview: {exc}") from None
        return aiohttp.web.Response(
            body=json.dumps(admission_response(review, uid, direct(payload))).encode(),
            content_type="application/json",
        )


def admission_response(review: Mapping[str, Any], uid: str, ops: JsonPatch | None) -> dict[str, Any]:
    """An AdmissionReview answer that admits, with ``ops`` as its JSON patch (as kopf answers)."""
    answer: dict[str, Any] = {"uid": uid, "allowed": True}
    if ops:
        answer["patch"] = base64.b64encode(json.dumps(ops).encode()).decode("ascii")
        answer["patchType"] = "JSONPatch"
    return {
        "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
        "kind": review.get("kind", "AdmissionReview"),
        "response": answer,
    }


def url_host(url: str) -> str:
    host = urllib.parse.urlsplit(url).hostname
    if not host:
        raise ValueError(f"--webhook-url {url!r} has no host")
    return host


def webhook_configuration(
    name: str, url: str, ca_pem: bytes, namespaces: tuple[str, ...], excluded_namespaces: tuple[str, ...]
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration for local development (URL + our CA)."""
    if namespaces:
        ns_selector: dict[str, Any] = {
            "matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": sorted(namespaces)}
            ]
        }
    else:
        ns_selector = {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "NotIn",
                    "values": sorted(excluded_namespaces),
                }
            ]
        }
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "marketplace-metering-operator"}},
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": TIMEOUT_SECONDS,
                "matchPolicy": "Equivalent",
                "reinvocationPolicy": "Never",
                "namespaceSelector": ns_selector,
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "operations": ["CREATE"],
                        "scope": "Namespaced",
                    }
                ],
                "clientConfig": {
                    "url": url.rstrip("/") + WEBHOOK_PATH,
                    "caBundle": base64.b64encode(ca_pem).decode("ascii"),
                },
            }
        ],
    }


def apply_webhook_configuration(api: client.ApiClient, body: dict[str, Any]) -> None:
    """Create or replace the configuration (we own it entirely in local mode)."""
    admission = client.AdmissionregistrationV1Api(api)
    name = body["metadata"]["name"]
    try:
        current = admission.read_mutating_webhook_configuration(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
        admission.create_mutating_webhook_configuration(body)
        return
    body = dict(body)
    body["metadata"] = dict(body["metadata"], resourceVersion=current.metadata.resource_version)
    admission.replace_mutating_webhook_configuration(name, body)


def delete_webhook_configuration(api: client.ApiClient, name: str) -> None:
    try:
        client.AdmissionregistrationV1Api(api).delete_mutating_webhook_configuration(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
