"""Emulator heartbeat capacity (moved here from tests/emulator/bench_heartbeats.py): what the emulator itself can
answer, so the other figures can say when the emulator, not the sidecar, is the bound.

Claims `items` work items, then drives compare-and-swap heartbeats (each echoing the previous `last_heartbeat`)
over `connections` keep-alive connections from a minimal HTTP/1.1 client (cheaper than httpx, so the client is not
the bound), and reports successful heartbeats per second and the emulator's CPU. Every answer must be a 200.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlsplit

from sidecar.wire import ANTHROPIC

from ._procs import KEY, EmulatorProcess

ENV = "env_emulator_capacity"
PREFIX = ANTHROPIC.work_path(ENV)
HEADERS = f"authorization: Bearer {KEY}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in ANTHROPIC.extra_headers.items())


class Connection:
    """One keep-alive HTTP/1.1 connection: a request, then its whole response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(self, method: str, target: str, body: bytes = b"") -> tuple[int, Any]:
        head = f"{method} {target} HTTP/1.1\r\nhost: bench\r\n{HEADERS}content-length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, json.loads(await self.reader.readexactly(length))

    def close(self) -> None:
        self.writer.close()


async def _claim(emulator: EmulatorProcess, connection: Connection, count: int) -> list[tuple[str, str]]:
    await emulator.enqueue(ENV, count)
    leases = []
    for _ in range(count):
        _, work = await connection.request("GET", f"{PREFIX}/poll")
        status, _ = await connection.request("POST", f"{PREFIX}/{work['id']}/ack")
        assert status == 200
        status, beat = await connection.request(
            "POST", f"{PREFIX}/{work['id']}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT&desired_ttl_seconds=600"
        )
        assert status == 200, beat
        leases.append((work["id"], beat["last_heartbeat"]))
    return leases


async def _drive(connection: Connection, leases: list[tuple[str, str]], until: float) -> int:
    done = 0
    current = dict(leases)
    while time.monotonic() < until:
        for work_id, last in list(current.items()):
            target = f"{PREFIX}/{work_id}/heartbeat?expected_last_heartbeat={last}&desired_ttl_seconds=600"
            status, beat = await connection.request("POST", target)
            if status != 200:
                raise RuntimeError(f"heartbeat answered {status}: {beat}")
            current[work_id] = beat["last_heartbeat"]
            done += 1
    return done


async def heartbeat_capacity(
    emulator: EmulatorProcess, seconds: float, connections: int = 64, items: int = 256
) -> dict[str, Any]:
    split = urlsplit(emulator.url)
    assert split.hostname is not None
    assert split.port is not None
    opened = [await Connection.open(split.hostname, split.port) for _ in range(connections)]
    try:
        per = max(1, items // connections)
        leases = [await _claim(emulator, connection, per) for connection in opened]
        cpu = emulator.child.cpu_seconds()
        started = time.monotonic()
        counts = await asyncio.gather(
            *(_drive(c, lease, started + seconds) for c, lease in zip(opened, leases, strict=True))
        )
        elapsed = time.monotonic() - started
    finally:
        for connection in opened:
            connection.close()
    total = sum(counts)
    return {
        "heartbeats_per_second": total / elapsed,
        "heartbeats": total,
        "seconds": round(elapsed, 2),
        "connections": connections,
        "leases": per * connections,
        "emulator_cores": (emulator.child.cpu_seconds() - cpu) / elapsed,
    }
