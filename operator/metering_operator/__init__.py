"""Kubernetes operator for AWS Marketplace RegisterUsage gating and hourly MeterUsage metering."""
