"""Fault injection per operation: throttling, internal errors, latency, lost answers, error codes.

Faults come from the config file's ``faults`` and from the admin API (runtime faults replace
file faults for the same operation and survive restarts). ``"*"`` applies to every operation
that has no entry of its own.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from metering_operator.emulator.config import LICENSE_MANAGER_OPERATIONS, OPERATIONS, Fault
from metering_operator.emulator.errors import AwsError
from metering_operator.emulator.state import State

_KEY = "faults"
_STS = {"AssumeRoleWithWebIdentity", "GetCallerIdentity"}
# Each service spells throttling and internal errors its own way: (throttled, internal).
_CODES = {
    **{op: ("Throttling", "InternalFailure") for op in _STS},
    **{op: ("RateLimitExceededException", "ServerInternalException") for op in LICENSE_MANAGER_OPERATIONS},
}
_METERING_CODES = ("ThrottlingException", "InternalServiceErrorException")


class Faults:
    def __init__(self, state: State, from_config: dict[str, Fault], rng: random.Random | None = None) -> None:
        self._state = state
        self._config = dict(from_config)
        self._runtime = {op: Fault.model_validate(f) for op, f in state.get_kv(_KEY, {}).items()}
        self._rng = rng or random.Random()

    def set_config(self, from_config: dict[str, Fault]) -> None:
        self._config = dict(from_config)

    def set(self, operation: str, fault: Fault) -> None:
        if operation != "*" and operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        self._runtime[operation] = fault
        self._store()

    def clear(self) -> None:
        self._runtime.clear()
        self._config.clear()
        self._store()

    def _store(self) -> None:
        self._state.set_kv(_KEY, {op: f.model_dump(by_alias=True) for op, f in self._runtime.items()})

    def effective(self) -> dict[str, dict[str, Any]]:
        merged = {**self._config, **self._runtime}
        return {op: f.model_dump(by_alias=True) for op, f in merged.items()}

    def for_operation(self, operation: str) -> Fault | None:
        for table in (self._runtime, self._config):
            if operation in table:
                return table[operation]
        for table in (self._runtime, self._config):
            if "*" in table:
                return table["*"]
        return None

    async def apply(self, operation: str, product_code: str | None = None) -> None:
        """Sleep the injected latency, then raise an injected error if the dice say so."""
        fault = self.for_operation(operation)
        if fault is None:
            return
        if fault.product_codes and product_code not in fault.product_codes:
            return
        if fault.latency_ms:
            await asyncio.sleep(fault.latency_ms / 1000)
        throttled, internal = _CODES.get(operation, _METERING_CODES)
        if fault.fail_with:
            raise AwsError(fault.fail_with, f"Injected failure for {operation}.", injected=True)
        if fault.throttle_rate and self._rng.random() < fault.throttle_rate:
            raise AwsError(throttled, "Rate exceeded", injected=True)
        if fault.fail_all or (fault.error_rate and self._rng.random() < fault.error_rate):
            raise AwsError(internal, "An internal error has occurred (injected).", injected=True)

    async def delay_answer(self, operation: str, product_code: str | None = None) -> None:
        """Sleep the injected answer latency (after the operation was processed and recorded)."""
        fault = self.for_operation(operation)
        if fault is not None and fault.product_codes and product_code not in fault.product_codes:
            return
        if fault is not None and fault.answer_latency_ms:
            await asyncio.sleep(fault.answer_latency_ms / 1000)

    def unprocessed(self, operation: str) -> bool:
        fault = self.for_operation(operation)
        return bool(fault and fault.unprocessed_rate and self._rng.random() < fault.unprocessed_rate)
