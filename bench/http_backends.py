"""The sidecar's Work API client over each HTTP transport: CPU and latency per heartbeat (a measurement).

    .venv/bin/python -m bench.http_backends [--seconds 8] [--items 200] [--concurrency 32]

For each `--http-backend` (aiohttp, httpx) it claims `--items` items from an emulator in its own process, then
(1) drives compare-and-swap heartbeats from `--concurrency` tasks for `--seconds` and reports heartbeats per second
and this process's CPU per heartbeat, and (2) sends 300 heartbeats one at a time and reports their p50 latency.
Every heartbeat must succeed (a 412 would mean a broken CAS and raises). This is what chose aiohttp as the default.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from sidecar.workapi import HTTP_BACKENDS, NO_HEARTBEAT, WorkApiClient

from ._procs import CHILDREN, KEY, EmulatorProcess, percentile

ENV = "env_http_backends"


async def measure(emulator: EmulatorProcess, backend: str, items: int, seconds: float, concurrency: int) -> str:
    await emulator.enqueue(ENV, items)
    async with WorkApiClient(
        provider="anthropic", api_key=KEY, environment_id=ENV, base_url=emulator.url, http_backend=backend
    ) as client:
        last: dict[str, str] = {}
        for _ in range(items):
            work = await client.poll(block_ms=100)
            assert work is not None, "the emulator ran out of items"
            await client.ack(work.id)
            beat = await client.heartbeat(work.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=600)
            last[work.id] = beat.last_heartbeat
        ids = list(last)
        count = 0
        cpu_start, started = time.process_time(), time.monotonic()

        async def beat_some(mine: list[str]) -> None:
            nonlocal count
            turn = 0
            while time.monotonic() - started < seconds:
                work_id = mine[turn % len(mine)]
                turn += 1
                result = await client.heartbeat(work_id, expected_last_heartbeat=last[work_id], desired_ttl_seconds=600)
                last[work_id] = result.last_heartbeat
                count += 1

        await asyncio.gather(*(beat_some(ids[k::concurrency]) for k in range(concurrency)))
        cpu, wall = time.process_time() - cpu_start, time.monotonic() - started
        latencies = []
        for turn in range(300):
            work_id = ids[turn % len(ids)]
            sent = time.perf_counter()
            result = await client.heartbeat(work_id, expected_last_heartbeat=last[work_id], desired_ttl_seconds=600)
            latencies.append((time.perf_counter() - sent) * 1000)
            last[work_id] = result.last_heartbeat
    p50 = percentile(latencies, 50) or 0.0
    return (
        f"{backend:8s} {count / wall:7.0f} heartbeats/s   {cpu / count * 1000:5.2f} ms CPU each (client)"
        f"   one at a time: p50 {p50:.2f} ms"
    )


async def main(seconds: float, items: int, concurrency: int) -> None:
    emulator = await EmulatorProcess.start(default_ttl=600)
    try:
        for backend in HTTP_BACKENDS:
            print(await measure(emulator, backend, items, seconds, concurrency), flush=True)
    finally:
        await emulator.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.http_backends", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.seconds, args.items, args.concurrency))
    finally:
        CHILDREN.kill_all()
