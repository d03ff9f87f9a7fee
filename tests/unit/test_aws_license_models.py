"""License Manager request/result models: wire names, the model's constraints, clear refusals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import botocore.session
import pytest
from pydantic import ValidationError

from metering_operator.aws.license_models import (
    MARKETPLACE_KEY_FINGERPRINT,
    CheckoutLicenseRequest,
    CheckoutLicenseResult,
    CheckoutType,
    EntitlementData,
    GetLicenseRequest,
    GetLicenseResult,
    ListReceivedLicensesRequest,
)

SEAT = EntitlementData(name="seats", unit="Count", value="1")


def request(**changes: object) -> CheckoutLicenseRequest:
    base: dict[str, object] = {
        "ProductSKU": "prod-1",
        "CheckoutType": CheckoutType.PROVISIONAL,
        "KeyFingerprint": MARKETPLACE_KEY_FINGERPRINT,
        "Entitlements": (SEAT,),
        "ClientToken": "pod-uid-1",
    }
    base.update(changes)
    return CheckoutLicenseRequest.model_validate(base)


def test_checkout_request_is_boto_keyword_arguments_botocore_accepts() -> None:
    params = request(NodeId="node-a").to_boto()
    assert params == {
        "ProductSKU": "prod-1",
        "CheckoutType": "PROVISIONAL",
        "KeyFingerprint": MARKETPLACE_KEY_FINGERPRINT,
        "Entitlements": ({"Name": "seats", "Value": "1", "Unit": "Count"},),
        "ClientToken": "pod-uid-1",
        "NodeId": "node-a",
    }
    model = botocore.session.get_session().get_service_model("license-manager")
    shape = model.operation_model("CheckoutLicense").input_shape
    assert set(params) <= set(shape.members)
    assert set(shape.required_members) <= set(params)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"Entitlements": ()}, "at least 1"),
        ({"Entitlements": (SEAT, SEAT)}, "asked for twice"),
        ({"ClientToken": "two words"}, "pattern"),
        ({"ClientToken": "x" * 2049}, "at most 2048"),
        ({"CheckoutType": "FOREVER"}, "PROVISIONAL"),
    ],
)
def test_bad_checkout_requests_fail_naming_the_problem(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValidationError) as exc:
        request(**changes)
    assert fragment in str(exc.value)


@pytest.mark.parametrize("value", ["0", "-1", "lots", "NaN"])
def test_counted_entitlements_need_a_positive_value(value: str) -> None:
    with pytest.raises(ValidationError, match="seats"):
        EntitlementData(name="seats", unit="Count", value=value)


def test_features_hold_nothing_and_counts_default_to_one() -> None:
    assert EntitlementData(name="premium", unit="None").quantity == 0
    assert EntitlementData(name="seats", unit="Count").quantity == 1
    assert EntitlementData(name="gb", unit="Gigabytes", value="2.5").quantity == Decimal("2.5")
    with pytest.raises(ValidationError):
        EntitlementData.model_validate({"Name": "seats", "Unit": "Seats"})


def test_checkout_result_parses_times_as_utc_and_refuses_zoneless_ones() -> None:
    result = CheckoutLicenseResult.from_boto(
        {
            "CheckoutType": "PROVISIONAL",
            "LicenseConsumptionToken": "t" * 32,
            "EntitlementsAllowed": [{"Name": "seats", "Unit": "Count", "Value": "1"}],
            "IssuedAt": "2031-07-09T12:20:00+02:00",
            "Expiration": "2031-07-09T11:20:00Z",
            "SignedToken": "a.b.c",
            "ResponseMetadata": {"RequestId": "r"},
            "SomethingNew": 1,
        }
    )
    assert result.issued_at == datetime(2031, 7, 9, 10, 20, tzinfo=UTC)
    assert result.expiration == datetime(2031, 7, 9, 11, 20, tzinfo=UTC)
    assert result.entitlements_allowed == (SEAT,)
    with pytest.raises(ValidationError):
        CheckoutLicenseResult.from_boto({"LicenseConsumptionToken": "t", "Expiration": "2031-07-09T11:20:00"})


def test_get_and_list_requests_apply_the_model_constraints() -> None:
    with pytest.raises(ValidationError, match="pattern"):
        GetLicenseRequest(license_arn="not-an-arn")
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        ListReceivedLicensesRequest(max_results=101)
    with pytest.raises(ValidationError):
        ListReceivedLicensesRequest.model_validate({"Filters": [{"Name": "Color", "Values": ["red"]}]})
    listed = ListReceivedLicensesRequest.model_validate(
        {"Filters": [{"Name": "ProductSKU", "Values": ["prod-1"]}], "MaxResults": 5}
    )
    assert listed.to_boto() == {"Filters": ({"Name": "ProductSKU", "Values": ("prod-1",)},), "MaxResults": 5}


def test_license_reads_entitlements_and_provisional_ttl() -> None:
    result = GetLicenseResult.from_boto(
        {
            "License": {
                "LicenseArn": "arn:aws:license-manager::294406891311:license:l-1",
                "ProductSKU": "prod-1",
                "Issuer": {"Name": "AWS/Marketplace", "KeyFingerprint": MARKETPLACE_KEY_FINGERPRINT},
                "Validity": {"Begin": "2031-01-01T00:00:00Z"},
                "Entitlements": [{"Name": "seats", "Unit": "Count", "MaxCount": 3, "Overage": False}],
                "ConsumptionConfiguration": {"ProvisionalConfiguration": {"MaxTimeToLiveInMinutes": 60}},
            }
        }
    )
    seats = result.license.entitlement("seats")
    assert seats is not None
    assert (seats.max_count, seats.overage) == (3, False)
    configuration = result.license.consumption_configuration
    assert configuration is not None
    assert configuration.provisional_configuration is not None
    assert configuration.provisional_configuration.max_time_to_live_in_minutes == 60
