"""`metering-operator run`: the operator process (kopf, with the operator's own flags).

Builds :class:`~metering_operator.settings.OperatorSettings` from flags (and a few environment
variables the chart sets), resolves the AWS Region explicitly, starts the Prometheus endpoint,
prepares the admission webhook (certificates, and in local mode its MutatingWebhookConfiguration),
imports the handler modules and hands over to ``kopf.run``. Settings, clock and the gate's shared
runtime reach the handlers through kopf's ``memo``:

* ``memo.settings`` -- OperatorSettings
* ``memo.admission_server`` -- the webhook server (None without the webhook)
* ``memo.clock`` -- the Clock (local time bounded by the API server's, or following the
  emulator's settable clock)
* ``memo.scheduler`` -- the one thread stepping every product (the gate's controllers and
  metering's sampling cycles): :mod:`metering_operator.gate.scheduler`
* ``memo.gate_runtime`` -- the entitlement gate's clients and worker pool
* ``memo.metering_runtime`` -- metering's clients, Lease elector and journal
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from metering_operator.domain.clock import BoundedClock, Clock, ReferenceClock

log = logging.getLogger("metering_operator.run")


def _env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, "").split(",") if item.strip()]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_argument_group("what to watch")
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        dest="namespaces",
        metavar="NS",
        help="watch MeteredProducts (and their pods) in this namespace; repeatable",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default when no --namespace is given)",
    )
    scope.add_argument(
        "--trusted-product-code",
        action="append",
        default=[],
        dest="trusted_product_codes",
        metavar="CODE",
        help="only MeteredProducts with one of these product codes are served; repeatable "
        "(also MMO_TRUSTED_PRODUCT_CODES, comma-separated). None given: every code is trusted.",
    )
    pins = parser.add_argument_group("seller pins (what a MeteredProduct must be, see README)")
    pins.add_argument(
        "--pin",
        action="append",
        default=[],
        dest="pins",
        metavar="JSON",
        help='a pin as a JSON object: {"productCode", "namespace", "name", "minMode", "scope", '
        '"dimensions", "publicKey", "publicKeyVersion"}; repeatable',
    )
    pins.add_argument(
        "--pins-file",
        default=None,
        metavar="PATH",
        help="a YAML or JSON file with a list of pins (or {pins: [...]}), added to --pin",
    )
    aws = parser.add_argument_group("AWS")
    aws.add_argument(
        "--region",
        default=None,
        help="AWS Region the cluster runs in (default: AWS_REGION / AWS_DEFAULT_REGION)",
    )
    ops = parser.add_argument_group("operations")
    ops.add_argument(
        "--log-format", choices=["text", "json"], default=os.environ.get("MMO_LOG_FORMAT", "text")
    )
    ops.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    ops.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics port (0: off)")
    ops.add_argument("--health-port", type=int, default=8081, help="liveness endpoint /healthz port (0: off)")
    ops.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace the operator runs in (default: POD_NAMESPACE or 'default')",
    )
    ops.add_argument(
        "--operator-identity",
        default=os.environ.get("POD_NAME", ""),
        help="this replica's identity for leader election (default: POD_NAME or hostname-pid)",
    )
    ops.add_argument(
        "--emulator-clock-url",
        default=None,
        help="test/demo only: follow the emulator's settable clock (its base or admin URL)",
    )
    hook = parser.add_argument_group("admission webhook (adds the entitlement gate to new pods)")
    hook.add_argument(
        "--no-webhook",
        action="store_true",
        help="do not serve the webhook (pods must carry the gate in their template)",
    )
    hook.add_argument("--webhook-host", default="0.0.0.0", help="listen address")
    hook.add_argument("--webhook-port", type=int, default=9443, help="listen port")
    hook.add_argument(
        "--webhook-cert-dir",
        default=None,
        help="directory with tls.crt and tls.key (in a cluster: the chart's Secret)",
    )
    hook.add_argument(
        "--webhook-url",
        default=None,
        help="local mode: the URL the API server calls; the operator then generates a "
        "self-signed CA and manages the MutatingWebhookConfiguration itself",
    )
    hook.add_argument(
        "--webhook-configuration-name",
        default="marketplace-metering-operator",
        help="name of the MutatingWebhookConfiguration managed in local mode",
    )
    policies = parser.add_argument_group("admission policies (enforcement inside the API server)")
    policies.add_argument(
        "--admission-policies",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="local mode: install the ValidatingAdmissionPolicies (and, where served, the "
        "MutatingAdmissionPolicy that adds the gate) bound to the identity this process runs as; "
        "they stay in force after it stops. Default: on with --webhook-url (in a cluster the chart "
        "installs them)",
    )
    policies.add_argument(
        "--admission-policy-prefix",
        default=None,
        help="name prefix (and policy-set label) of the installed policies "
        "(default: --webhook-configuration-name)",
    )
    gate = parser.add_argument_group("entitlement")
    gate.add_argument(
        "--token-expiration-seconds",
        type=int,
        default=600,
        help="lifetime of the pod-bound tokens minted for STS (>= 600)",
    )
    gate.add_argument(
        "--ungated-pod-action",
        choices=["Evict", "Report"],
        default=os.environ.get("MMO_UNGATED_POD_ACTION", "Evict"),
        help="Enforce mode: a pod found running without the gate whose registration is denied (or "
        "fails for good) is evicted through the Eviction API (Evict, the default) or only reported "
        "with Events (Report)",
    )
    meter = parser.add_argument_group("metering")
    meter.add_argument(
        "--sample-interval-seconds",
        type=float,
        default=None,
        help="override every product's sampling interval (tests, demo)",
    )
    meter.add_argument(
        "--ledger-history", type=int, default=48, help="closed ledger entries kept per dimension"
    )
    meter.add_argument("--lease-name", default="marketplace-metering-operator-leader")
    meter.add_argument("--lease-duration-seconds", type=float, default=15.0)
    meter.add_argument(
        "--aws-read-timeout-seconds",
        type=float,
        default=5.0,
        help="read timeout of MeterUsage calls; a longer wait counts as a lost answer (default 5)",
    )
    meter.add_argument("--aws-connect-timeout-seconds", type=float, default=3.0)
    meter.add_argument(
        "--clock-tolerance-seconds",
        type=float,
        default=30.0,
        help="how far the local clock may drift from the API server's before the operator uses the "
        "API server's (default 30)",
    )
    parser.add_argument(
        "--record-sweep-interval-seconds",
        type=float,
        default=3600.0,
        help="how often to remove the records (denials, metering journal) of deleted MeteredProducts "
        "that can no longer matter (default 3600; 0: never)",
    )


def load_pins(pin_args: list[str], pins_file: str | None) -> Any:
    """Pins from ``--pin`` JSON objects and a ``--pins-file``; ValueError naming what is wrong."""
    import json

    import yaml
    from pydantic import ValidationError

    from metering_operator.domain.pins import Pins

    items: list[Any] = []
    for n, text in enumerate(pin_args, 1):
        try:
            items.append(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--pin #{n} is not a JSON object: {exc}") from None
    if pins_file:
        try:
            loaded = yaml.safe_load(Path(pins_file).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"--pins-file {pins_file}: {exc}") from None
        if isinstance(loaded, dict) and set(loaded) == {"pins"}:
            loaded = loaded["pins"]
        if not isinstance(loaded, list):
            raise ValueError(f"--pins-file {pins_file}: expected a list of pins (or {{pins: [...]}})")
        items.extend(loaded)
    try:
        return Pins.parse(items)
    except ValidationError as exc:
        raise ValueError(f"invalid pins: {_validation_text(exc)}") from None


def _validation_text(exc: Any) -> str:
    """pydantic's errors as one line: ``pin #2.minMode: Input should be ...``."""
    parts = []
    for error in exc.errors():
        loc = list(error["loc"])
        if len(loc) >= 2 and loc[0] == "pins" and isinstance(loc[1], int):
            loc = [f"pin #{loc[1] + 1}", *loc[2:]]
        where = ".".join(str(p) for p in loc)
        message = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def build_settings(args: argparse.Namespace) -> Any:
    """OperatorSettings from the parsed flags; raises ValueError with a clear message."""
    from pydantic import ValidationError

    from metering_operator.aws.region import resolve_region

    if args.all_namespaces and args.namespaces:
        raise ValueError("--all-namespaces and --namespace exclude each other")
    pins = load_pins(args.pins, args.pins_file)
    region = resolve_region(args.region)
    trusted = frozenset(args.trusted_product_codes) | frozenset(_env_list("MMO_TRUSTED_PRODUCT_CODES"))
    identity = args.operator_identity or f"{socket.gethostname()}-{os.getpid()}"
    try:
        return _settings(args, pins, region, trusted, identity)
    except ValidationError as exc:
        raise ValueError(_validation_text(exc)) from None


def _settings(
    args: argparse.Namespace, pins: Any, region: str, trusted: frozenset[str], identity: str
) -> Any:
    from metering_operator.settings import LogFormat, OperatorSettings

    return OperatorSettings(
        namespaces=tuple(dict.fromkeys(args.namespaces)),
        trusted_product_codes=trusted,
        pins=pins,
        region=region,
        log_format=LogFormat(args.log_format),
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        operator_namespace=args.operator_namespace,
        operator_identity=identity,
        emulator_clock_url=args.emulator_clock_url,
        webhook_enabled=not args.no_webhook,
        webhook_host=args.webhook_host,
        webhook_port=args.webhook_port,
        webhook_cert_dir=args.webhook_cert_dir,
        webhook_url=args.webhook_url,
        webhook_configuration_name=args.webhook_configuration_name,
        admission_policies=(
            bool(args.webhook_url) if args.admission_policies is None else args.admission_policies
        ),
        admission_policy_prefix=args.admission_policy_prefix or args.webhook_configuration_name,
        token_expiration_seconds=args.token_expiration_seconds,
        ungated_pod_action=args.ungated_pod_action,
        sample_interval_seconds=args.sample_interval_seconds,
        ledger_history=args.ledger_history,
        lease_name=args.lease_name,
        lease_duration_seconds=args.lease_duration_seconds,
        aws_read_timeout_seconds=args.aws_read_timeout_seconds,
        aws_connect_timeout_seconds=args.aws_connect_timeout_seconds,
        clock_tolerance_seconds=args.clock_tolerance_seconds,
        record_sweep_interval_seconds=args.record_sweep_interval_seconds,
    )


#: kopf's "succeeded" lines that come once per admitted pod or once per MeteredProduct event (every
#: status write's echo): noise that costs a formatted, written line each.
_ROUTINE_SUCCESSES = ("Handler 'spec-report' succeeded.", "Handler 'entitlement-gate-changes' succeeded.")


def _drop_webhook_successes(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if message.startswith("Webhook ") and message.endswith(" succeeded."):
        return False
    return message not in _ROUTINE_SUCCESSES


def _configure_logging(settings: Any, verbose: bool) -> None:
    import kopf

    from metering_operator.settings import LogFormat

    log_format = kopf.LogFormat.JSON if settings.log_format is LogFormat.JSON else kopf.LogFormat.FULL
    kopf.configure(verbose=verbose, log_format=log_format)
    if not verbose:
        # kopf's per-event debug lines and urllib3's connection chatter drown the operator's story.
        logging.getLogger("kopf.objects").setLevel(logging.INFO)
        logging.getLogger("urllib3").setLevel(logging.WARNING)
        # One access line per admission request and health probe is noise at 50 pods/s, as are
        # botocore's endpoint notice per pod client, kopf's "Webhook ... succeeded" per pod and its
        # "Handler ... succeeded" per product event of the two event handlers.
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
        logging.getLogger("botocore").setLevel(logging.WARNING)
        logging.getLogger("kopf.objects").addFilter(_drop_webhook_successes)


def _webhook_server(settings: Any) -> Any:
    """The webhook server (kopf's, with the direct admission path) with our certificates; in local
    mode also writes the configuration."""

    from metering_operator.kube import webhook
    from metering_operator.kube.apiclient import new_api_client

    host = webhook.url_host(settings.webhook_url) if settings.webhook_url else None
    if settings.webhook_cert_dir:
        cert_dir = Path(settings.webhook_cert_dir)
        certfile, keyfile = cert_dir / "tls.crt", cert_dir / "tls.key"
        ca_file = cert_dir / "ca.crt"
        ca_pem = ca_file.read_bytes() if ca_file.exists() else None
    else:
        hosts = [h for h in dict.fromkeys([host or "localhost", "localhost", "127.0.0.1"]) if h]
        certs = webhook.generate_serving_certs(Path(tempfile.mkdtemp(prefix="mmo-webhook-")), hosts)
        certfile, keyfile, ca_pem = certs.cert_file, certs.key_file, certs.ca_pem
    if settings.webhook_url:
        if ca_pem is None:
            raise ValueError("--webhook-url with --webhook-cert-dir needs a ca.crt in that directory")
        api = new_api_client(pool_size=1)
        try:
            webhook.apply_webhook_configuration(
                api,
                webhook.webhook_configuration(
                    settings.webhook_configuration_name,
                    settings.webhook_url,
                    ca_pem,
                    settings.namespaces,
                    ("kube-system", settings.operator_namespace) if not settings.namespaces else (),
                ),
            )
        finally:
            api.close()
        log.info(
            "MutatingWebhookConfiguration %s points at %s",
            settings.webhook_configuration_name,
            settings.webhook_url,
        )
    return webhook.AdmissionServer(
        addr=settings.webhook_host,
        port=settings.webhook_port,
        host=host,
        certfile=str(certfile),
        pkeyfile=str(keyfile),
        cadata=ca_pem,
    )


def _install_admission_policies(settings: Any) -> None:
    """Local mode: the chart's policies, bound to whoever this process authenticates as."""
    from metering_operator.admission import install
    from metering_operator.admission.objects import Install, service_account_of
    from metering_operator.domain.product import EntitlementMode
    from metering_operator.kube.apiclient import new_api_client

    api = new_api_client(pool_size=1)
    try:
        user = install.whoami(api)
        kinds = install.served_kinds(api)
        if "ValidatingAdmissionPolicy" not in kinds:
            raise ValueError(
                "this API server serves no ValidatingAdmissionPolicy (Kubernetes >= 1.30 needed)"
            )
        account = service_account_of(user)
        target = Install(
            prefix=settings.admission_policy_prefix,
            operator_user=user,
            operator_namespace=account[0] if account else "",
            operator_service_account=account[1] if account else "",
            namespaces=settings.namespaces,
            trusted_codes=tuple(sorted(settings.trusted_product_codes)),
            pins=tuple(
                (pin.product_code, pin.key, pin.min_mode is EntitlementMode.ENFORCE)
                for pin in settings.pins.pins
            ),
            mutating="MutatingAdmissionPolicy" in kinds,
            # A person's own credentials keep their rights; only a service account is narrowed.
            bound_operator=account is not None,
        )
        applied = install.apply(api, target)
    finally:
        api.close()
    log.info(
        "admission policies for %s (%s): %s%s",
        user,
        ",".join(settings.namespaces) or "all namespaces but kube-system",
        ", ".join(applied),
        "" if target.mutating else " (no MutatingAdmissionPolicy served: the webhook adds the gate)",
    )


def build_clocks(settings: Any) -> tuple[Clock, Clock, ReferenceClock | None]:
    """``(wall, clock, reference)``: the local wall clock, the operator's clock, and the
    reference the operator's clock is bounded by when the Lease reads must feed it.

    The operator's clock is the local one held within ``--clock-tolerance-seconds`` of a
    reference: the API server's ``Date`` (observed on every Lease read), or, in tests and the
    demo, the emulator's clock (which then also supplies the local clock's offset).
    """
    from datetime import timedelta

    from metering_operator.localclock import local_clock

    wall = local_clock()
    tolerance = timedelta(seconds=settings.clock_tolerance_seconds)
    if settings.emulator_clock_url:
        from metering_operator.emulator_clock import EmulatorClock

        emulated = EmulatorClock(settings.emulator_clock_url, wall=wall)
        return wall, BoundedClock(emulated, emulated.reference, tolerance), None
    reference = ReferenceClock()
    return wall, BoundedClock(wall, reference, tolerance), reference


def main(args: argparse.Namespace) -> int:
    from metering_operator.kube import lazyclient

    # Before kopf or any handler imports the Kubernetes client: its ~800 generated classes are
    # imported when first used instead of all at start (about 30 MiB of RSS).
    lazyclient.install()
    try:
        settings = build_settings(args)
    except ValueError as exc:
        print(f"metering-operator run: {exc}", file=sys.stderr)
        return 2

    import kopf
    from prometheus_client import start_http_server

    from metering_operator import metrics
    from metering_operator.handlers import entitlement, housekeeping, metering, pins  # noqa: F401

    _configure_logging(settings, args.verbose)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=metrics.REGISTRY)
    wall, clock, reference = build_clocks(settings)

    entitlement.register(settings)  # the metering handlers register themselves on import

    if settings.admission_policies:
        from kubernetes.client.rest import ApiException

        try:
            _install_admission_policies(settings)
        except (ApiException, ValueError) as exc:
            print(f"metering-operator run: admission policies: {exc}", file=sys.stderr)
            return 2

    server = None
    if settings.webhook_enabled:
        try:
            server = _webhook_server(settings)
        except (OSError, ValueError) as exc:
            print(f"metering-operator run: webhook: {exc}", file=sys.stderr)
            return 2

    @kopf.on.startup()
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.admission.server = server
        settings.admission.managed = None  # the chart (cluster) or _webhook_server (local) owns it
        settings.execution.max_workers = 16  # sync handlers only; products are stepped by the scheduler
        settings.posting.level = logging.WARNING
        settings.persistence.finalizer = "marketplace.metering.dev/operator"

    from metering_operator.gate.scheduler import Scheduler
    from metering_operator.kube.apiclient import new_api_client
    from metering_operator.kube.podcache import PodCache
    from metering_operator.metering.runtime import build_runtime as build_metering_runtime

    # One pod list + watch per namespace, shared by the gate and metering: a connection for each
    # namespace's watch and one for its (re)list.
    pod_cache = PodCache(new_api_client(pool_size=max(8, 2 * len(settings.namespaces) + 2)))
    # One thread steps every product: the gate's controllers and metering's sampling cycles.
    scheduler = Scheduler(clock)
    memo = kopf.Memo(
        settings=settings,
        admission_server=server,
        clock=clock,
        scheduler=scheduler,
        gate_runtime=entitlement.build_runtime(settings, clock, pod_cache, scheduler),
        metering_runtime=build_metering_runtime(
            settings, clock, wall=wall, reference=reference, cache=pod_cache
        ),
    )
    log.info(
        "starting: region=%s namespaces=%s trusted=%s pinned=%s webhook=%s",
        settings.region,
        ",".join(settings.namespaces) or "(all)",
        ",".join(sorted(settings.trusted_product_codes)) or "(any)",
        ",".join(p.product_code for p in settings.pins.pins) or "(none)",
        settings.webhook_url or ("on" if settings.webhook_enabled else "off"),
    )
    kopf.run(
        standalone=True,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz" if settings.health_port else None,
        memo=memo,
    )
    return 0
