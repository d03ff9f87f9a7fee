"""The entitlement gate's services: registering pods (AWS side) and the per-product control loop.

Between the pure rules in :mod:`metering_operator.domain.entitlement` and the thin kopf glue in
:mod:`metering_operator.handlers.entitlement`.
"""
