"""Faults after apply: the emulator applies the operation, then spoils its answer on the wire.

Read with a raw socket (what each fault writes is the point): every kind leaves the item changed as by a clean
request, and the request log records the real status.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import pytest

from .conftest import ANTHROPIC, ENV, NO_HEARTBEAT, Api

PREFIX = ANTHROPIC.prefix(ENV)


def _request(path: str) -> bytes:
    head = "".join(f"{name}: {value}\r\n" for name, value in ANTHROPIC.headers.items())
    return f"POST {path} HTTP/1.1\r\nhost: emulator\r\ncontent-length: 0\r\n{head}\r\n".encode()


async def _open(api: Api) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(api.url)
    return await asyncio.open_connection(url.hostname, url.port)


async def _read_all(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Everything until the server closes the connection (or `timeout`)."""
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except (TimeoutError, ConnectionError):
        pass
    return b"".join(chunks)


async def _claimed(api: Api) -> dict[str, Any]:
    """An acked item, not yet heartbeated (`starting`)."""
    await api.enqueue()
    work = await api.polled(ANTHROPIC, "worker-1")
    assert (await api.ack(ANTHROPIC, work["id"], "worker-1")).status_code == 200
    return work


@pytest.mark.parametrize(
    ("kind", "check"),
    [
        ("lose", lambda raw: raw == b""),
        ("garbage", lambda raw: raw and not raw.startswith(b"HTTP/")),
        ("length_and_chunked", lambda raw: b"content-length:" in raw and b"transfer-encoding: chunked" in raw),
        ("two_lengths", lambda raw: raw.count(b"content-length:") == 2),
    ],
)
async def test_the_heartbeat_is_applied_and_its_answer_spoilt(api: Api, kind: str, check: Any) -> None:
    work = await _claimed(api)
    api.emulator.inject_fault("heartbeat", after_apply=kind)
    reader, writer = await _open(api)
    writer.write(_request(f"{PREFIX}/{work['id']}/heartbeat?expected_last_heartbeat={NO_HEARTBEAT}"))
    raw = await _read_all(reader)
    writer.close()
    assert check(raw), raw[:300]
    view = await api.view(work["id"])
    assert view["state"] == "active" and view["heartbeats"] == 1, "applied"
    assert [e["status"] for e in await api.requests("heartbeat")] == [200]


async def test_a_dripped_answer_comes_one_byte_at_a_time(api: Api) -> None:
    work = await _claimed(api)
    api.emulator.inject_fault("heartbeat", after_apply="drip", drip_ms=50)
    reader, writer = await _open(api)
    writer.write(_request(f"{PREFIX}/{work['id']}/heartbeat?expected_last_heartbeat={NO_HEARTBEAT}"))
    started = time.monotonic()
    first = await asyncio.wait_for(reader.read(65536), 5)
    assert first == b"H", "one byte"
    after_half_a_second = await _read_all(reader, timeout=0.5)
    assert 3 <= len(after_half_a_second) <= 12, "about one byte every drip_ms"
    writer.close()
    assert time.monotonic() - started < 2
    assert (await api.view(work["id"]))["state"] == "active", "applied before the first byte"


async def test_twice_sends_the_answer_then_a_stray_one_on_the_kept_alive_connection(api: Api) -> None:
    work = await _claimed(api)
    api.emulator.inject_fault("heartbeat", after_apply="twice", stray_delay_ms=100)
    reader, writer = await _open(api)
    writer.write(_request(f"{PREFIX}/{work['id']}/heartbeat?expected_last_heartbeat={NO_HEARTBEAT}"))
    raw = b""
    async with asyncio.timeout(5):
        while raw.count(b"HTTP/1.1 200") < 2 or not raw.endswith(b"{}"):
            raw += await reader.read(65536)
    assert b"work_heartbeat" in raw and raw.endswith(b"\r\n\r\n{}"), raw
    assert not writer.is_closing(), "the connection stays open"
    writer.write(_request(f"{PREFIX}/{work['id']}/heartbeat?expected_last_heartbeat={NO_HEARTBEAT}"))
    answer = await asyncio.wait_for(reader.read(65536), 5)
    assert answer.startswith(b"HTTP/1.1 412"), "the same connection serves the next request"
    writer.close()


async def test_after_apply_faults_are_validated(api: Api) -> None:
    for bad in (
        {"operation": "heartbeat", "after_apply": "explode"},
        {"operation": "heartbeat", "after_apply": "lose", "status": 500},
        {"operation": "heartbeat", "after_apply": "lose", "drop": True},
        {"operation": "heartbeat", "after_apply": "drip", "drip_ms": -1},
        {"operation": "heartbeat", "after_apply": "twice", "stray_delay_ms": True},
    ):
        assert (await api.http.post("/_emulator/faults", json=bad)).status_code == 400, bad
    added = await api.admin.inject_fault("*", after_apply="lose", count=2)
    assert added["after_apply"] == "lose" and added["count"] == 2


@pytest.mark.parametrize("operation", ["poll", "ack", "stop", "get", "update", "list", "stats"])
async def test_every_operation_is_applied_before_its_answer_is_lost(api: Api, operation: str) -> None:
    [item] = await api.enqueue()
    work_id = item["id"]
    if operation in ("ack", "stop", "get", "update"):
        assert (await api.polled(ANTHROPIC, "worker-1"))["id"] == work_id
    api.emulator.inject_fault(operation, after_apply="lose")
    calls = {
        "poll": ("GET", "/poll"),
        "ack": ("POST", f"/{work_id}/ack"),
        "stop": ("POST", f"/{work_id}/stop"),
        "get": ("GET", f"/{work_id}"),
        "update": ("POST", f"/{work_id}"),
        "list": ("GET", ""),
        "stats": ("GET", "/stats"),
    }
    method, suffix = calls[operation]
    body = {"metadata": {"k": "v"}} if operation == "update" else ({"force": True} if operation == "stop" else None)
    with pytest.raises(Exception) as caught:  # noqa: PT011  # whatever the client library calls a lost answer
        await api.call(ANTHROPIC, method, suffix, worker="worker-1", json=body)
    assert "Timeout" not in type(caught.value).__name__, "lost at once, not answered late"
    assert [e["status"] for e in await api.requests(operation)] == [200], "applied, answer lost"
    view = await api.view(work_id)
    applied = {
        "poll": view["deliveries"] == 1,
        "ack": view["state"] == "starting",
        "stop": view["state"] == "stopped",
        "update": view["metadata"] == {"k": "v"},
    }
    assert applied.get(operation, True), view
