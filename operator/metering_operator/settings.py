"""Operator settings, parsed from `metering-operator run` flags (and the chart's values).

One immutable object, handed to handlers through kopf's ``memo`` so no module reads globals.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from metering_operator.domain.entitlement import UngatedPodAction
from metering_operator.domain.pins import Pins


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class OperatorSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    # --- shared ---
    namespaces: tuple[str, ...] = Field(
        default=(), description="Namespaces to watch; empty means all namespaces (cluster-wide)."
    )
    trusted_product_codes: frozenset[str] = Field(
        default=frozenset(),
        description="If non-empty, MeteredProducts whose productCode is not listed are refused.",
    )
    pins: Pins = Field(
        default_factory=Pins,
        description="Seller pins per product code (--pin, --pins-file): what a product must be, "
        "whatever its MeteredProduct says.",
    )
    region: str = Field(description="AWS Region the cluster runs in; resolved at start-up, never hard-coded.")
    log_format: LogFormat = LogFormat.TEXT
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    health_port: int = Field(default=8081, ge=0, le=65535)
    operator_namespace: str = Field(
        default="default",
        description="Namespace the operator runs in (leases and its own Events live there).",
    )
    operator_identity: str = Field(
        default="", description="This replica's identity for leader election (defaults to hostname-pid)."
    )
    emulator_clock_url: str | None = Field(
        default=None,
        description="Test/demo only: follow the emulator's settable clock at this admin URL.",
    )

    # --- entitlement (issue 4) ---
    webhook_enabled: bool = Field(
        default=True, description="Serve the pod admission webhook that adds the entitlement gate."
    )
    webhook_host: str = Field(default="0.0.0.0", description="Address the admission webhook listens on.")
    webhook_port: int = Field(default=9443, ge=0, le=65535)
    webhook_cert_dir: str | None = Field(
        default=None, description="Directory with tls.crt/tls.key; None generates a self-signed pair."
    )
    webhook_url: str | None = Field(
        default=None,
        description="Local development: URL the API server calls (the operator then manages the "
        "MutatingWebhookConfiguration itself with its self-signed CA).",
    )
    webhook_configuration_name: str = Field(
        default="marketplace-metering-operator",
        description="Name of the MutatingWebhookConfiguration the operator manages in local mode.",
    )
    admission_policies: bool = Field(
        default=False,
        description="Local mode: install the admission policies bound to the operator's own identity.",
    )
    admission_policy_prefix: str = Field(
        default="marketplace-metering-operator",
        description="Name prefix and policy-set label of the admission policies installed in local mode.",
    )
    token_expiration_seconds: int = Field(default=600, ge=600)
    ungated_pod_action: UngatedPodAction = Field(
        default=UngatedPodAction.EVICT,
        description="Enforce: what to do with a pod running without the gate whose registration is "
        "denied (or fails for good): Evict (Eviction API) or Report (Events only).",
    )

    # --- metering (issue 5) ---
    sample_interval_seconds: float | None = Field(
        default=None, gt=0, description="Override every product's sampling interval (tests, demo)."
    )
    ledger_history: int = Field(default=48, ge=1, description="Closed ledger entries kept per dimension.")
    lease_name: str = Field(default="marketplace-metering-operator-leader")
    lease_duration_seconds: float = Field(default=15.0, gt=0)
    aws_connect_timeout_seconds: float = Field(
        default=3.0, gt=0, le=60, description="Connect timeout of the operator's MeterUsage calls."
    )
    aws_read_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="Read timeout of the operator's MeterUsage calls: past it the answer counts as lost "
        "and the hour is Unknown until a resend is answered.",
    )
    clock_tolerance_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How far the local clock may be from the API server's (or the emulator's) before "
        "the operator uses the reference clock instead.",
    )

    record_sweep_interval_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="How often the operator removes its own records (denials, metering journal) of "
        "deleted MeteredProducts that can no longer matter; 0 turns the sweep off.",
    )

    @model_validator(mode="after")
    def _pins_fit(self) -> OperatorSettings:
        for pin in self.pins.pins:
            if self.namespaces and pin.namespace not in self.namespaces:
                raise ValueError(
                    f"the pin for product code {pin.product_code} names MeteredProduct {pin.key}, "
                    f"in a namespace the operator does not watch ({', '.join(self.namespaces)})"
                )
            if self.trusted_product_codes and pin.product_code not in self.trusted_product_codes:
                raise ValueError(
                    f"pinned product code {pin.product_code} is not among the trusted product codes"
                )
        return self
