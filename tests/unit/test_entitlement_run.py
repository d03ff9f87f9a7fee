"""`metering-operator run` flags -> OperatorSettings, and the webhook's certificates and configuration."""

from __future__ import annotations

import argparse
import base64
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from metering_operator.commands import run
from metering_operator.kube import webhook
from metering_operator.settings import LogFormat


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    run.configure_parser(parser)
    return parser.parse_args(argv)


def test_flags_become_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMO_TRUSTED_PRODUCT_CODES", "envcode, other")
    settings = run.build_settings(
        parse(
            "--namespace",
            "a",
            "--namespace",
            "b",
            "--namespace",
            "a",
            "--trusted-product-code",
            "flagcode",
            "--region",
            "eu-west-3",
            "--log-format",
            "json",
            "--metrics-port",
            "9100",
            "--health-port",
            "9101",
            "--no-webhook",
        )
    )
    assert settings.namespaces == ("a", "b")
    assert settings.trusted_product_codes == {"flagcode", "envcode", "other"}
    assert settings.region == "eu-west-3"
    assert settings.log_format is LogFormat.JSON
    assert (settings.metrics_port, settings.health_port) == (9100, 9101)
    assert settings.webhook_enabled is False


def test_region_comes_from_the_environment_never_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ValueError, match="no AWS Region"):
        run.build_settings(parse())
    monkeypatch.setenv("AWS_REGION", "ap-south-2")
    assert run.build_settings(parse()).region == "ap-south-2"


def test_conflicting_namespace_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="exclude each other"):
        run.build_settings(parse("--all-namespaces", "--namespace", "a", "--region", "eu-west-1"))


def test_main_reports_bad_settings_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run.main(parse("--region", "not a region")) == 2
    assert "not an AWS Region" in capsys.readouterr().err


def test_serving_certificate_chains_to_the_ca_and_names_the_hosts(tmp_path: Path) -> None:
    certs = webhook.generate_serving_certs(tmp_path, ["127.0.0.1", "operator.ns.svc"])
    cert = x509.load_pem_x509_certificate(certs.cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["operator.ns.svc"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    ca = x509.load_pem_x509_certificate(certs.ca_pem)
    cert.verify_directly_issued_by(ca)
    # The pair loads into a TLS server context, as kopf's server will load it.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certs.cert_file, certs.key_file)


def test_local_webhook_configuration() -> None:
    body = webhook.webhook_configuration("mwc", "https://127.0.0.1:9443/", b"CA", ("b", "a"), ())
    (hook,) = body["webhooks"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["clientConfig"]["url"] == "https://127.0.0.1:9443/gate-pods"
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == b"CA"
    assert hook["namespaceSelector"]["matchExpressions"][0] == {
        "key": "kubernetes.io/metadata.name",
        "operator": "In",
        "values": ["a", "b"],
    }
    assert hook["rules"][0]["operations"] == ["CREATE"]
    everywhere = webhook.webhook_configuration("mwc", "https://h:1", b"CA", (), ("kube-system", "ops"))
    assert everywhere["webhooks"][0]["namespaceSelector"]["matchExpressions"][0]["operator"] == "NotIn"
    with pytest.raises(ValueError, match="no host"):
        webhook.url_host("https://:9443")


@pytest.mark.parametrize(
    ("argv", "installs"),
    [
        (("--webhook-url", "https://127.0.0.1:9443"), True),
        (("--webhook-url", "https://127.0.0.1:9443", "--no-admission-policies"), False),
        ((), False),
        (("--no-webhook", "--admission-policies"), True),
    ],
    ids=["local-mode", "local-opt-out", "in-cluster", "explicit"],
)
def test_local_mode_installs_admission_policies_by_default(argv: tuple[str, ...], installs: bool) -> None:
    settings = run.build_settings(parse("--region", "eu-west-1", *argv))
    assert settings.admission_policies is installs


def test_admission_policy_prefix_defaults_to_the_webhook_configuration_name() -> None:
    settings = run.build_settings(
        parse("--region", "eu-west-1", "--webhook-configuration-name", "mine", "--webhook-url", "https://x:1")
    )
    assert settings.admission_policy_prefix == "mine"
    settings = run.build_settings(parse("--region", "eu-west-1", "--admission-policy-prefix", "other"))
    assert settings.admission_policy_prefix == "other"
