"""Fault injection: latency, error statuses with retry headers, dropped connections, for the next K
requests of an operation (optionally of one environment)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._errors import ApiError

OPERATIONS = ("poll", "ack", "heartbeat", "stop", "get", "update", "list", "stats")


@dataclass
class Fault:
    operation: str
    count: int = 1
    environment_id: str | None = None
    status: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    should_retry: bool | None = None
    drop: bool = False
    latency_ms: int = 0

    @classmethod
    def from_json(cls, body: Any) -> Fault:
        if not isinstance(body, dict):
            raise ApiError(400, "a fault is a JSON object")
        operation = body.get("operation")
        if operation not in OPERATIONS:
            raise ApiError(400, f"operation must be one of {', '.join(OPERATIONS)}")
        status = body.get("status")
        if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
            raise ApiError(400, "status must be an HTTP error status (400..599)")
        count = body.get("count", 1)
        if not isinstance(count, int) or count < 1:
            raise ApiError(400, "count must be a positive integer")
        fault = cls(
            operation=operation,
            count=count,
            environment_id=body.get("environment_id"),
            status=status,
            retry_after=None if body.get("retry_after") is None else str(body["retry_after"]),
            retry_after_ms=None if body.get("retry_after_ms") is None else str(body["retry_after_ms"]),
            should_retry=body.get("should_retry"),
            drop=bool(body.get("drop", False)),
            latency_ms=int(body.get("latency_ms", 0)),
        )
        if fault.status is None and not fault.drop and not fault.latency_ms:
            raise ApiError(400, "a fault needs a status, drop or latency_ms")
        return fault

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["retry-after"] = self.retry_after
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = self.retry_after_ms
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Faults:
    def __init__(self) -> None:
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> None:
        self._faults.append(fault)

    def clear(self) -> None:
        self._faults.clear()

    def take(self, operation: str, environment_id: str) -> Fault | None:
        """The first fault matching this request, with one use consumed."""
        for fault in self._faults:
            if fault.operation == operation and fault.environment_id in (None, environment_id):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def listing(self) -> list[dict[str, Any]]:
        return [f.to_json() for f in self._faults]
