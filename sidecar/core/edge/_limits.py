"""What a sandbox may send: every client-supplied string has a length and a character set.

A request outside these gets INVALID_ARGUMENT with a message that names the field and the rule, never the
value itself (a 1 MB id is not echoed back, a newline in an id never reaches a log line). Requests whose bytes
are not a valid message (bad protobuf, invalid UTF-8 in a string) get INVALID_ARGUMENT too, not UNKNOWN:
`add_to_server` registers the service with deserializers that turn such bytes into `Malformed`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from ...work.v1 import work_service_pb2 as pb
from ._status import SidecarRpcError, error

WORK_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
MAX_TOKEN = 512
"""Longer lease tokens are refused like wrong ones (PERMISSION_DENIED, as any token that does not match)."""
SANDBOX_ID = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces or control characters
PAGE_TOKEN = re.compile(r"[A-Za-z0-9_.~=:-]{1,1024}")
METADATA_KEY = re.compile(r"[\x21-\x7e]{1,256}")
MAX_METADATA_VALUE = 8192
MAX_METADATA_KEYS = 100


def invalid(message: str) -> SidecarRpcError:
    return error(grpc.StatusCode.INVALID_ARGUMENT, message, "INVALID_ARGUMENT")


def check(pattern: re.Pattern[str], value: str, field: str, rule: str) -> None:
    if not pattern.fullmatch(value):
        raise invalid(f"{field} must be {rule}")


def check_work_id(value: str) -> None:
    if not value:
        raise invalid("work_id is required")
    check(WORK_ID, value, "work_id", "1 to 128 letters, digits, '_' or '-'")


def check_sandbox_id(value: str) -> None:
    if value:
        check(SANDBOX_ID, value, "sandbox_id", "1 to 256 printable ASCII characters without spaces")


def check_page_token(value: str) -> None:
    if value:
        check(PAGE_TOKEN, value, "page_token", "a next_page_token from ListWork (at most 1024 URL-safe characters)")


def check_metadata(set_: Mapping[str, str], remove: list[str]) -> None:
    if len(set_) + len(remove) > MAX_METADATA_KEYS:
        raise invalid(f"at most {MAX_METADATA_KEYS} metadata keys at once")
    for key in [*set_, *remove]:
        check(METADATA_KEY, key, "metadata keys", "1 to 256 printable ASCII characters without spaces")
    for value in set_.values():
        if len(value) > MAX_METADATA_VALUE:
            raise invalid(f"metadata values must be at most {MAX_METADATA_VALUE} characters")


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request whose bytes did not decode into its message type."""

    type_name: str
    reason: str

    def rejection(self) -> SidecarRpcError:
        return invalid(f"the request is not a valid {self.type_name} ({self.reason})")


def _lenient(kind: type[Message]) -> Any:
    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return kind.FromString(data)
        except (DecodeError, ValueError, RecursionError) as exc:
            return Malformed(kind.DESCRIPTOR.full_name, type(exc).__name__)

    return deserialize


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_to_server(servicer: object, server: grpc.aio.Server, service_name: str = "WorkService") -> None:
    """Register `servicer` like the generated `add_WorkServiceServicer_to_server`, with lenient deserializers."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request, response = getattr(pb, method.input_type.name), getattr(pb, method.output_type.name)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
