"""Every failure becomes a gRPC status with a proper code and `google.rpc` details.

Work API errors keep their facts in an `ErrorInfo` (domain `work-sidecar`): the reason, the HTTP status,
the error type and the Work API's `request_id`. 429 adds a `RetryInfo`. Messages never contain secrets:
they are built from the client's exception texts, which carry none.

| Work API                        | gRPC                                                   |
|---------------------------------|--------------------------------------------------------|
| 412 (heartbeat CAS), lease lost | FAILED_PRECONDITION, reason LEASE_LOST                 |
| 400                             | INVALID_ARGUMENT, reason WORK_API_BAD_REQUEST          |
| 401                             | FAILED_PRECONDITION, reason WORK_API_UNAUTHENTICATED   |
| 403                             | PERMISSION_DENIED, reason WORK_API_PERMISSION_DENIED   |
| 404                             | NOT_FOUND, reason WORK_NOT_FOUND                       |
| 409                             | ABORTED, reason WORK_CONFLICT                          |
| 429                             | RESOURCE_EXHAUSTED + RetryInfo, reason RATE_LIMITED    |
| 5xx, timeouts, connection       | UNAVAILABLE, reason WORK_API_UNAVAILABLE               |
| malformed answer                | INTERNAL, reason WORK_API_BAD_RESPONSE                 |

The sandbox's own errors: a missing or wrong lease token is PERMISSION_DENIED (reason
LEASE_TOKEN_MISMATCH, the same for an unknown work id so tokens cannot be probed), bad arguments are
INVALID_ARGUMENT, and calls while draining that would start new work are UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ...workapi import (
    APIStatusError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionFailedError,
    RateLimitError,
    ResponseError,
    TransportError,
    WorkApiError,
)

DOMAIN = "work-sidecar"


class SidecarRpcError(Exception):
    """Raised inside the service; turned into the status it carries."""

    def __init__(self, status: grpc.Status) -> None:
        super().__init__(status.details)
        self.status = status


def build_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    metadata: Mapping[str, str] | None = None,
    retry_delay: float | None = None,
) -> grpc.Status:
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata or {})))
    details.append(info)
    if retry_delay is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_delay * 1e9))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    proto = status_pb2.Status(code=code.value[0], message=message, details=details)
    status: grpc.Status = rpc_status.to_status(proto)
    return status


def error(
    code: grpc.StatusCode, message: str, reason: str, metadata: Mapping[str, str] | None = None
) -> SidecarRpcError:
    return SidecarRpcError(build_status(code, message, reason, metadata))


def from_work_api(exc: WorkApiError) -> grpc.Status:
    metadata = {"operation": exc.operation or ""}
    retry_delay: float | None = None
    if isinstance(exc, APIStatusError):
        metadata.update(http_status=str(exc.status_code), error_type=exc.error_type)
        if exc.request_id:
            metadata["request_id"] = exc.request_id
    code, reason = grpc.StatusCode.UNAVAILABLE, "WORK_API_UNAVAILABLE"
    if isinstance(exc, LeaseLostError | PreconditionFailedError):
        code, reason = grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST"
    elif isinstance(exc, BadRequestError):
        code, reason = grpc.StatusCode.INVALID_ARGUMENT, "WORK_API_BAD_REQUEST"
    elif isinstance(exc, AuthenticationError):
        code, reason = grpc.StatusCode.FAILED_PRECONDITION, "WORK_API_UNAUTHENTICATED"
    elif isinstance(exc, PermissionDeniedError):
        code, reason = grpc.StatusCode.PERMISSION_DENIED, "WORK_API_PERMISSION_DENIED"
    elif isinstance(exc, NotFoundError):
        code, reason = grpc.StatusCode.NOT_FOUND, "WORK_NOT_FOUND"
    elif isinstance(exc, ConflictError):
        code, reason = grpc.StatusCode.ABORTED, "WORK_CONFLICT"
    elif isinstance(exc, RateLimitError):
        code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"
        retry_delay = exc.retry_after if exc.retry_after is not None else 1.0
    elif isinstance(exc, ResponseError):
        code, reason = grpc.StatusCode.INTERNAL, "WORK_API_BAD_RESPONSE"
    elif isinstance(exc, TransportError | APIStatusError):
        code, reason = grpc.StatusCode.UNAVAILABLE, "WORK_API_UNAVAILABLE"
    return build_status(code, str(exc), reason, metadata, retry_delay)


async def abort(context: grpc.aio.ServicerContext[object, object], status: grpc.Status) -> NoReturn:
    await context.abort_with_status(status)
    raise AssertionError("abort_with_status returned")  # pragma: no cover
