"""The raw-transport hook for faults after apply: the operation was applied, and its answer is spoilt on the wire.

ASGI cannot say "send this answer twice" or "frame it with two lengths", so these faults write bytes on the
server's transport themselves (the ASGI `send` of uvicorn's protocols is a bound method of a cycle that holds it).
Under another server without that transport every kind degrades to `lose` done the ASGI way: a response started
and never finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from starlette.types import Send

from ._faults import Fault

STRAY_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
"""The stray second answer of `twice`: a well-formed answer to no request."""
GARBAGE = b"\x16\x03\x01\x00\xa5 these bytes are not an HTTP answer \xff\xfe\r\n\r\n"


def _head(
    status: int, headers: Sequence[tuple[bytes, bytes]], *, lengths: Sequence[int] = (), chunked: bool = False
) -> bytes:
    reason = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode()]
    lines += [name + b": " + value + b"\r\n" for name, value in headers if name.lower() != b"content-length"]
    lines += [b"content-length: %d\r\n" % length for length in lengths]
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    return b"".join(lines) + b"\r\n"


def _framed(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    return _head(status, headers, lengths=[len(body)]) + body


async def spoil_answer(
    send: Send, fault: Fault, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> None:
    """Answer an applied operation as `fault.after_apply` says (see `_faults.py`)."""
    cycle: Any = getattr(send, "__self__", None)
    transport: Any = getattr(cycle, "transport", None)
    kind = fault.after_apply
    if kind == "twice":
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})
        await send({"type": "http.response.body", "body": body})
        if transport is None:
            return
        if fault.stray_delay_ms:
            await asyncio.sleep(fault.stray_delay_ms / 1000)
        if not transport.is_closing():
            transport.write(STRAY_ANSWER)
        return
    if transport is None or not hasattr(transport, "write"):
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b"{", "more_body": True})
        return
    if kind == "lose":
        transport.abort()
    else:
        await _write_spoilt(transport, fault, status, headers, body)
        transport.close()
    await _until_disconnected(cycle)


async def _write_spoilt(
    transport: Any, fault: Fault, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
) -> None:
    kind = fault.after_apply
    if kind == "garbage":
        transport.write(GARBAGE)
    elif kind == "length_and_chunked":
        head = _head(status, headers, lengths=[len(body)], chunked=True)
        transport.write(head + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    elif kind == "two_lengths":
        transport.write(_head(status, headers, lengths=[len(body), len(body) + 1]) + body)
    elif kind == "drip":
        for byte in _framed(status, headers, body):
            if transport.is_closing():
                return
            transport.write(bytes((byte,)))
            await asyncio.sleep(fault.drip_ms / 1000)


async def _until_disconnected(cycle: Any) -> None:
    """Wait (briefly) for the server to see the connection lost, so that it does not answer the request itself."""
    for _ in range(200):
        if getattr(cycle, "disconnected", True) or getattr(cycle, "response_complete", True):
            return
        await asyncio.sleep(0.005)
