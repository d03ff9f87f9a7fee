"""The one place a ledger entry becomes a MeterUsage request.

Every attempt for an entry -- the first, a resend after a lost answer, a resend by another
process after a crash -- is built from the entry alone (its frozen quantity and type,
allocations, hour and ClientToken), so it is identical and AWS answers it idempotently.
"""

from __future__ import annotations

from datetime import datetime

from metering_operator.aws.models import MeterUsageRequest, Tag, UsageAllocation
from metering_operator.domain import ledger
from metering_operator.domain.ledger import DimensionRule, LedgerEntry


def meter_usage_request(
    product_code: str, entry: LedgerEntry, *, dry_run: bool = False, rule: DimensionRule | None = None
) -> MeterUsageRequest:
    """The MeterUsage request for ``entry`` (``rule`` only for entries written before their type was)."""
    quantity = ledger.entry_quantity(entry, rule)
    allocations = tuple(
        UsageAllocation(
            allocated_usage_quantity_decimal=a.quantity.value if quantity.decimal else None,
            allocated_usage_quantity=None if quantity.decimal else int(a.quantity.value),
            tags=tuple(Tag(key=k, value=v) for k, v in a.tags) or None,
        )
        for a in ledger.entry_allocations(entry, quantity)
    )
    return MeterUsageRequest(
        product_code=product_code,
        timestamp=entry.hour,
        usage_dimension=entry.dimension,
        client_token=entry.client_token,
        usage_allocations=allocations or None,
        dry_run=True if dry_run else None,
        usage_quantity_decimal=quantity.value if quantity.decimal else None,
        usage_quantity=None if quantity.decimal else int(quantity.value),
    )


#: How a permission check's ClientToken starts: AWS's call logs (and the emulator's) tell it from a
#: record, whose token is the ledger's 64-hex-digit ``ledger.client_token``.
PERMISSION_CHECK_TOKEN_PREFIX = "permission-check-"


def permission_check_request(
    product_code: str, dimension: str, now: datetime, nonce: str
) -> MeterUsageRequest:
    """The DryRun MeterUsage of the permission check: quantity 0 at ``now``, nothing billed.

    Its ClientToken is ``permission-check-<nonce>`` (botocore would otherwise fill in a random
    one): a dry run records nothing, so there is nothing for AWS to deduplicate, but the token
    says what the call was.
    """
    return MeterUsageRequest(
        product_code=product_code,
        timestamp=now.replace(microsecond=0),
        usage_dimension=dimension,
        usage_quantity=0,
        dry_run=True,
        client_token=f"{PERMISSION_CHECK_TOKEN_PREFIX}{nonce}",
    )
