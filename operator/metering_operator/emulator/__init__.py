"""A local emulator of the AWS Marketplace Metering Service, AWS License Manager (the contract
checkout operations) and STS web-identity login.

One aiohttp port speaks AWS JSON 1.1 (RegisterUsage, MeterUsage, BatchMeterUsage,
ResolveCustomer; CheckoutLicense, ExtendLicenseConsumption, CheckInLicense, GetLicense,
ListReceivedLicenses), the STS query protocol (AssumeRoleWithWebIdentity, GetCallerIdentity) and a
JSON admin API under ``/_emulator/``; see docs/emulator.md. Entry point: ``server.run``.
"""
