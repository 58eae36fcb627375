"""Fault injection, per operation (optionally per environment), for the next K requests or until cleared.

Before the operation is applied, a fault adds latency, answers an error status (with optional `retry-after`,
`retry-after-ms`, `x-should-retry`), or drops the connection without a response. After it is applied (`after_apply`),
a fault spoils the answer: `lose` closes the connection without it, `garbage` sends bytes that are not HTTP,
`length_and_chunked` and `two_lengths` send it with contradictory framing (then close), `drip` sends it one byte
every `drip_ms` (past any client's deadline), `twice` sends it and then a stray second answer (`{}` after
`stray_delay_ms`) on the kept-alive connection. For one request, the first matching latency-only fault and the
first matching status/drop/after-apply fault each apply (and each lose one use), so latency and errors combine.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any

from ..wire import OPERATIONS, RETRY_AFTER_HEADER, RETRY_AFTER_MS_HEADER, SHOULD_RETRY_HEADER
from ._errors import ApiError

_FIELDS = {
    "operation",
    "environment_id",
    "count",
    "status",
    "error_type",
    "message",
    "retry_after",
    "retry_after_ms",
    "should_retry",
    "drop",
    "latency_ms",
    "after_apply",
    "drip_ms",
    "stray_delay_ms",
}
AFTER_APPLY = ("lose", "garbage", "length_and_chunked", "two_lengths", "drip", "twice")
"""What an after-apply fault does to the answer of an operation the emulator applied."""
_ids = itertools.count(1)


@dataclass
class Fault:
    id: int
    operation: str
    """An operation name, or `*` for every operation."""
    environment_id: str | None = None
    count: int | None = 1
    """Uses left; None: until cleared."""
    status: int | None = None
    error_type: str | None = None
    message: str | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    should_retry: bool | None = None
    drop: bool = False
    latency_ms: int = 0
    after_apply: str | None = None
    """One of `AFTER_APPLY`: the operation is applied, then its answer is spoilt so."""
    drip_ms: int = 200
    """`drip`: milliseconds between the answer's bytes."""
    stray_delay_ms: int = 0
    """`twice`: milliseconds between the answer and the stray second one."""

    @property
    def is_latency_only(self) -> bool:
        return self.status is None and not self.drop and self.after_apply is None

    @classmethod
    def from_json(cls, body: Any) -> Fault:
        if not isinstance(body, dict):
            raise ApiError(400, "a fault is a JSON object")
        unknown = set(body) - _FIELDS
        if unknown:
            raise ApiError(400, f"unknown fault fields: {', '.join(sorted(unknown))}")
        operation = body.get("operation")
        if not isinstance(operation, str) or (operation != "*" and operation not in OPERATIONS):
            raise ApiError(400, f"operation must be * or one of {', '.join(OPERATIONS)}")
        count = body.get("count", 1)
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ApiError(400, "count must be a positive integer (or null: until cleared)")
        status = body.get("status")
        if status is not None and (not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599):
            raise ApiError(400, "status must be an HTTP error status (400..599)")
        latency = body.get("latency_ms", 0)
        if not isinstance(latency, int) or isinstance(latency, bool) or not 0 <= latency <= 600_000:
            raise ApiError(400, "latency_ms must be an integer from 0 to 600000")
        drop = body.get("drop", False)
        should_retry = body.get("should_retry")
        if not isinstance(drop, bool) or (should_retry is not None and not isinstance(should_retry, bool)):
            raise ApiError(400, "drop and should_retry are booleans")
        environment_id = body.get("environment_id")
        for name in ("environment_id", "error_type", "message"):
            if body.get(name) is not None and not isinstance(body[name], str):
                raise ApiError(400, f"{name} must be a string")
        after_apply, drip_ms, stray_delay_ms = _after_apply(body)
        if sum((status is not None, drop, after_apply is not None)) > 1:
            raise ApiError(
                400, "a fault either answers a status, drops the connection or spoils the answer after apply"
            )
        if status is None and not drop and not latency and after_apply is None:
            raise ApiError(400, "a fault needs a status, drop, after_apply or latency_ms")
        return cls(
            id=next(_ids),
            operation=operation,
            environment_id=environment_id,
            count=count,
            status=status,
            error_type=body.get("error_type"),
            message=body.get("message"),
            retry_after=_header_value(body.get("retry_after"), "retry_after"),
            retry_after_ms=_header_value(body.get("retry_after_ms"), "retry_after_ms"),
            should_retry=should_retry,
            drop=drop,
            latency_ms=latency,
            after_apply=after_apply,
            drip_ms=drip_ms,
            stray_delay_ms=stray_delay_ms,
        )

    def matches(self, operation: str, environment_id: str | None) -> bool:
        return (self.operation == "*" or self.operation == operation) and self.environment_id in (
            None,
            environment_id,
        )

    def error(self) -> ApiError:
        assert self.status is not None
        headers: dict[str, str] = {}
        if self.retry_after is not None:
            headers[RETRY_AFTER_HEADER] = self.retry_after
        if self.retry_after_ms is not None:
            headers[RETRY_AFTER_MS_HEADER] = self.retry_after_ms
        if self.should_retry is not None:
            headers[SHOULD_RETRY_HEADER] = "true" if self.should_retry else "false"
        return ApiError(
            self.status,
            self.message or f"injected fault: HTTP {self.status}",
            error_type=self.error_type,
            headers=headers,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _after_apply(body: dict[str, Any]) -> tuple[str | None, int, int]:
    after_apply = body.get("after_apply")
    if after_apply is not None and after_apply not in AFTER_APPLY:
        raise ApiError(400, f"after_apply must be one of {', '.join(AFTER_APPLY)}")
    drip_ms, stray_delay_ms = body.get("drip_ms", 200), body.get("stray_delay_ms", 0)
    for name, value in (("drip_ms", drip_ms), ("stray_delay_ms", stray_delay_ms)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 600_000:
            raise ApiError(400, f"{name} must be an integer from 0 to 600000")
    return after_apply, drip_ms, stray_delay_ms


def _header_value(value: Any, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ApiError(400, f"{name} must be a string or a number")
    return str(value)


class Faults:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def __bool__(self) -> bool:
        return bool(self._faults)

    def add(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def remove(self, fault_id: int) -> bool:
        before = len(self._faults)
        self._faults = [f for f in self._faults if f.id != fault_id]
        return len(self._faults) != before

    def clear(self) -> None:
        self._faults.clear()

    def take(self, operation: str, environment_id: str | None) -> tuple[int, Fault | None]:
        """(added latency in ms, the status/drop/after-apply fault) for one request; each applied fault loses one
        use."""
        latency = 0
        action: Fault | None = None
        found_latency = False
        for fault in list(self._faults):
            if not fault.matches(operation, environment_id):
                continue
            if fault.is_latency_only:
                if found_latency:
                    continue
                found_latency = True
            elif action is not None:
                continue
            else:
                action = fault
            latency += fault.latency_ms
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
            if found_latency and action is not None:
                break
        return latency, action

    def listing(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self._faults]
