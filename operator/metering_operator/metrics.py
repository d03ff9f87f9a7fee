"""All Prometheus metrics the operator exports, in one place so names stay consistent.

Metric names follow Prometheus conventions (``_total`` counters, base units in seconds). Label
values are bounded: product codes and dimension names come from MeteredProducts, error codes from
the AWS model, never from pod names. The gate's per-product series carry the MeteredProduct's
``namespace`` and ``product`` (name) next to its ``product_code``: one code may be sold through
products in several namespaces, and each must keep its own series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
NAMESPACE = "marketplace_metering"

REGISTRATIONS = Counter(
    "registrations_total",
    "RegisterUsage outcomes per pod, by product and result (granted, denied, error, retried).",
    ["namespace", "product", "product_code", "result"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LICENSE_CALLS = Counter(
    "license_calls_total",
    "License Manager calls of contract products' seats, by operation (CheckoutLicense, "
    "ExtendLicenseConsumption, CheckInLicense) and outcome (granted, exhausted, denied, extended, "
    "checked_in, gone, retried, error).",
    ["namespace", "product", "product_code", "operation", "outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
SEATS_HELD = Gauge(
    "license_seats_held",
    "License Manager checkouts (leases) the operator holds now for a contract product.",
    ["namespace", "product", "product_code"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
GATE_LATENCY = Histogram(
    "gate_latency_seconds",
    "Time from pod creation to the entitlement gate being removed.",
    ["namespace", "product", "product_code"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
PODS_GATED = Gauge(
    "pods_gated",
    "Pods currently held behind the entitlement scheduling gate, by product and state.",
    ["namespace", "product", "product_code", "state"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
UNGATED_PODS = Counter(
    "ungated_pods_total",
    "Enforce-mode pods found running without a verified grant and denied (or failing for good), "
    "by product and what was done (evicted, reported).",
    ["namespace", "product", "product_code", "action"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
AWS_CALL_LATENCY = Histogram(
    "aws_call_duration_seconds",
    "Latency of AWS calls made by the operator, by operation.",
    ["operation"],
    namespace=NAMESPACE,
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
AWS_CALL_ERRORS = Counter(
    "aws_call_errors_total",
    "AWS calls that failed, by operation and AWS error code.",
    ["operation", "code"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LEDGER_ENTRIES = Gauge(
    "ledger_entries",
    "Metering ledger entries held in MeteredProduct status, by product and state.",
    ["namespace", "product", "state"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LAST_SENT_HOUR = Gauge(
    "last_sent_hour_timestamp_seconds",
    "Start of the latest hour whose usage MeterUsage accepted, by product code and dimension.",
    ["product_code", "dimension"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
METERED_QUANTITY = Counter(
    "metered_quantity_total",
    "Usage quantity accepted by MeterUsage, by product code and dimension.",
    ["product_code", "dimension"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PIN_VIOLATIONS = Gauge(
    "pin_violations",
    "Fields where a MeteredProduct is weaker than the seller's pin (1 while violated; the pin is "
    "obeyed instead), or that uses a product code pinned to another MeteredProduct.",
    ["namespace", "product", "product_code", "field"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PINNED_PRODUCT_MISSING = Gauge(
    "pinned_product_missing",
    "1 while the MeteredProduct a seller pin names does not exist (or is being deleted), else 0.",
    ["namespace", "product", "product_code"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
PRODUCT_EVENTS = Counter(
    "product_events_total",
    "MeteredProduct watch events seen by a handler (entitlement-gate-changes, spec-report), by "
    "outcome: acted on, or skipped as changing nothing the handler reads (e.g. a status write's echo).",
    ["handler", "outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
SPEC_CHANGES = Counter(
    "spec_changes_total",
    "Changes of a MeteredProduct's product code, entitlement mode or scope, dryRun or dimensions, "
    "by field and whether the change weakens the product.",
    ["namespace", "product", "field", "weakens"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LEDGER_UNCONFIRMED = Counter(
    "ledger_unconfirmed_total",
    "Hours whose MeterUsage answer never arrived within AWS's window (possibly not billed), by "
    "product code and dimension.",
    ["product_code", "dimension"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
STATUS_REPAIRS = Counter(
    "status_repairs_total",
    "Metering status found edited or lost and repaired, by namespace and product.",
    ["namespace", "product"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
CLOCK_SKEW = Gauge(
    "clock_skew_seconds",
    "The local clock minus the reference clock (the API server's Date, or the emulator's clock).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RECORDS_REMOVED = Counter(
    "records_removed_total",
    "The operator's own record ConfigMaps (denials, metering journal) of deleted MeteredProducts "
    "removed once they could no longer matter, by kind.",
    ["kind"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
RECORD_SWEEPS = Counter(
    "record_sweeps_total",
    "Completed sweeps over the operator's record ConfigMaps (see records_removed_total).",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LEASE_ROUNDS = Counter(
    "lease_rounds_total",
    "Metering leader election rounds by outcome: led (acquired or renewed), deferred (another "
    "replica's renewal is live), lost (another replica wrote first), error.",
    ["outcome"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
LEADER = Gauge(
    "leader",
    "1 while this replica holds the metering Lease (only the leader meters), else 0.",
    namespace=NAMESPACE,
    registry=REGISTRY,
)
FAILED_HOURS = Gauge(
    "failed_hours",
    "Closed hours in a row, newest first, in which the product's usage could not be reported "
    "(spec.metering.onFailure acts when this reaches afterHours; 0 once an hour is reported).",
    ["namespace", "product"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)
METERING_PERMITTED = Gauge(
    "meter_usage_permitted",
    "1 when the last DryRun MeterUsage check of the product was permitted, 0 when it was refused.",
    ["namespace", "product"],
    namespace=NAMESPACE,
    registry=REGISTRY,
)


def remove_product_series(namespace: str, name: str) -> None:
    """The product stopped metering: its onFailure and permission series go with it."""
    for gauge in (FAILED_HOURS, METERING_PERMITTED):
        gauge.remove(namespace, name)  # absent labels: no-op
