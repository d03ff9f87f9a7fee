"""Reporting what a buyer does to a MeteredProduct, against the seller's pins and over time.

The gate and metering act on the *effective* spec (:func:`metering_operator.domain.pins.resolve`
is their one seam) and know nothing of this package. Here the operator *reports*:

* :mod:`.reporter` -- per MeteredProduct event: an Event and a counter for each change of product
  code, entitlement mode or scope, dryRun or dimensions (pinned or not), the ``Enforced``
  condition and ``status.observedSpec``, and for pinned products the violations (Event, gauge);
* :mod:`.presence` -- whether each pinned MeteredProduct exists (at start, on delete,
  periodically): an Event in the pinned namespace, a gauge and a log line when it does not.
"""
