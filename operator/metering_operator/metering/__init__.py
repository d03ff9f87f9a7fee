"""Hourly metering's services: the per-product cycle, the send protocol and its journal.

Between the pure ledger in :mod:`metering_operator.domain.ledger` and the thin kopf glue in
:mod:`metering_operator.handlers.metering` (the same shape as :mod:`metering_operator.gate`):

* :mod:`.plan` -- a MeteredProduct as metering sees it, and which product owns a product code;
* :mod:`.request` -- the one place a ledger entry becomes a MeterUsage request;
* :mod:`.protocol` -- one call and its typed outcome, and the ledger transition for each;
* :mod:`.journal` -- the live entries kept where only the operator writes (a ConfigMap);
* :mod:`.status` -- the metering half of the status, through the pydantic models;
* :mod:`.cycle` -- one sampling and sending round for one product;
* :mod:`.runtime` -- the clients and settings every product's cycle shares;
* :mod:`.hooks` -- the crash test hook.

docs/metering.md describes the protocol, each state and each failure.
"""
