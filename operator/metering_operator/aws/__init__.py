"""boto3 adapters for the AWS Marketplace Metering Service, AWS License Manager and STS web-identity login.

* :mod:`.models`  typed requests/results of RegisterUsage, MeterUsage, BatchMeterUsage, ResolveCustomer
* :mod:`.license_models`  typed requests/results of CheckoutLicense, ExtendLicenseConsumption,
  CheckInLicense, GetLicense, ListReceivedLicenses
* :mod:`.errors`  ``MeteringError`` and the classification of every modelled error
* :mod:`.client`  ``MeteringClient`` over an unmodified boto3 client, ``MeteringClientFactory``
* :mod:`.license_manager`  ``LicenseManagerClient``, ``LicenseManagerClientFactory``
* :mod:`.irsa`    per-pod IRSA credentials (STS AssumeRoleWithWebIdentity) and their cache
* :mod:`.region`  explicit Region resolution (never a default Region)
* :mod:`.backoff` exponential backoff with full jitter

Submodules are imported explicitly (``from metering_operator.aws.client import MeteringClient``)
so that importing the models does not load boto3.
"""
