"""The Work API's error envelope: `{"type":"error","error":{"type","message","details"?},"request_id"}`."""

from __future__ import annotations

from typing import Any

from ..wire import ERROR_TYPE, error_type_for

__all__ = ["ApiError", "error_type_for"]


class ApiError(Exception):
    """An error answer of the Work API. The message never carries a credential."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str | None = None,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or error_type_for(status)
        self.details = details
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {"type": self.error_type, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"type": ERROR_TYPE, "error": error, "request_id": request_id}
