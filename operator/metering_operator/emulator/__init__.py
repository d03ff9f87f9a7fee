"""A local emulator of the AWS Marketplace Metering Service and STS web-identity login.

One aiohttp port speaks AWS JSON 1.1 (RegisterUsage, MeterUsage, BatchMeterUsage,
ResolveCustomer), the STS query protocol (AssumeRoleWithWebIdentity, GetCallerIdentity) and a
JSON admin API under ``/_emulator/``; see docs/emulator.md. Entry point: ``server.run``.
"""
