"""Validate JSON request bodies against botocore's own service model.

Type mismatches answer ``SerializationException`` and constraint violations (required, length,
range, pattern) answer ``ValidationException`` with AWS's "N validation errors detected"
message. Constraints the service reports with its own modelled errors (tags, allocation
counts) are left to the operation logic, so e.g. six tags give ``InvalidTagException``.
"""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import botocore.session

from metering_operator.emulator.errors import AwsError

_MAX_REPORTED = 10


@lru_cache(maxsize=4)
def service_model(name: str) -> Any:
    return botocore.session.get_session().get_service_model(name)


class _Ctx:
    def __init__(self, exempt: frozenset[str]) -> None:
        self.errors: list[str] = []
        self.exempt = exempt


def validate(service: str, operation: str, body: Any, exempt: frozenset[str] = frozenset()) -> None:
    shape = service_model(service).operation_model(operation).input_shape
    ctx = _Ctx(exempt)
    _check(shape, body, "", ctx)
    if ctx.errors:
        n = len(ctx.errors)
        shown = "; ".join(ctx.errors[:_MAX_REPORTED])
        raise AwsError("ValidationException", f"{n} validation error{'s' if n > 1 else ''} detected: {shown}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strict_json(raw: bytes) -> Any:
    """Parse JSON as AWS does: NaN and Infinity (which Python's json accepts) are refused.

    Raises ``ValueError`` (also for bad UTF-8) or ``RecursionError`` (absurd nesting).
    """
    return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)


def _lower_first(name: str) -> str:
    return name[:1].lower() + name[1:]


def _serialization(path: str, expected: str) -> AwsError:
    where = f" at '{path}'" if path else ""
    return AwsError("SerializationException", f"Expected {expected}{where}.")


def _check(shape: Any, value: Any, path: str, ctx: _Ctx) -> None:
    kind = shape.type_name
    meta = shape.metadata
    constrained = shape.name not in ctx.exempt
    if kind == "structure":
        if not isinstance(value, dict):
            raise _serialization(path, "a JSON object")
        for member in shape.required_members:
            if value.get(member) is None:
                ctx.errors.append(
                    f"Value null at '{_join(path, _lower_first(member))}' failed to satisfy constraint: "
                    "Member must not be null"
                )
        for name, member_shape in shape.members.items():
            if name in value and value[name] is not None:
                _check(member_shape, value[name], _join(path, _lower_first(name)), ctx)
        return
    if kind == "list":
        if not isinstance(value, list):
            raise _serialization(path, "a JSON array")
        if constrained:
            _length(meta, len(value), path, ctx, "length")
        for index, item in enumerate(value, start=1):
            if item is None:
                raise _serialization(f"{path}.{index}.member", "a value, not null")
            _check(shape.member, item, f"{path}.{index}.member", ctx)
        return
    if kind == "string":
        if not isinstance(value, str):
            raise _serialization(path, "a string")
        if constrained:
            _length(meta, len(value), path, ctx, "length")
            pattern = meta.get("pattern")
            if pattern and not _fullmatch(pattern, value):
                ctx.errors.append(
                    f"Value '{value[:80]}' at '{path}' failed to satisfy constraint: "
                    f"Member must satisfy regular expression pattern: {pattern}"
                )
            enum = meta.get("enum")
            if enum and value not in enum:
                ctx.errors.append(
                    f"Value '{value[:80]}' at '{path}' failed to satisfy constraint: "
                    f"Member must satisfy enum value set: [{', '.join(enum)}]"
                )
        return
    if kind in ("integer", "long"):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
                value = int(value)
            else:
                raise _serialization(path, "an integer")
        if kind == "integer" and not -(2**31) <= value < 2**31:
            raise _serialization(path, "a 32-bit integer")
        if constrained:
            _length(meta, value, path, ctx, "value")
        return
    if kind == "boolean":
        if not isinstance(value, bool):
            raise _serialization(path, "a boolean")
        return
    if kind == "timestamp":
        to_epoch(value, path)
        return
    if kind in ("double", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _serialization(path, "a number")
        return
    # Shapes this service does not use (maps, blobs, documents) are accepted as they are.


def _length(meta: dict[str, Any], size: int, path: str, ctx: _Ctx, what: str) -> None:
    low, high = meta.get("min"), meta.get("max")
    if low is not None and size < low:
        ctx.errors.append(
            f"Value at '{path}' failed to satisfy constraint: "
            f"Member must have {what} greater than or equal to {low}"
        )
    if high is not None and size > high:
        ctx.errors.append(
            f"Value at '{path}' failed to satisfy constraint: "
            f"Member must have {what} less than or equal to {high}"
        )


@lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _fullmatch(pattern: str, value: str) -> bool:
    # AWS patterns are Java regexes matched against the whole value.
    return _compiled(pattern).fullmatch(value) is not None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def to_epoch(value: Any, path: str = "") -> float:
    """A JSON timestamp (epoch seconds, as botocore sends, or an ISO 8601 string) as epoch seconds."""
    if isinstance(value, bool):
        raise _serialization(path, "a timestamp")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or not 0 <= value < 253402300800:  # up to year 9999
            raise _serialization(path, "a timestamp")
        return float(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _serialization(path, "a timestamp") from None
        if parsed.tzinfo is None:
            raise _serialization(path, "a timestamp with a time zone")
        return parsed.timestamp()
    raise _serialization(path, "a timestamp")
