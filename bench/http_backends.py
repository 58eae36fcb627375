"""The sidecar's Work API client over each HTTP transport: CPU and latency per heartbeat (a measurement).

    .venv/bin/python -m bench.http_backends [--seconds 8] [--items 200] [--concurrency 32] [--layers]

For each `--http-backend` (httptools, httpx) it claims `--items` items from an emulator in its own
process, then (1) drives compare-and-swap heartbeats from `--concurrency` tasks for `--seconds` and reports
heartbeats per second and this process's CPU per heartbeat, and (2) sends 300 heartbeats one at a time and reports
their p50 latency. Every heartbeat must succeed (a 412 would mean a broken CAS and raises). This is what chose the
default backend (the lean httptools exchange).

`--layers` measures, on the same heartbeats, what each layer between the client and the socket costs (httpx stays
the interface unless a measurement proves a layer of it must go): the sidecar's client, a bare aiohttp
session, an httpx.Request handed to the httpx-aiohttp transport, and httpx.AsyncClient over that transport with and
without trust_env (netrc and proxies looked up per request, in the thread pool).
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


async def layers(emulator: EmulatorProcess, items: int, seconds: float, concurrency: int) -> None:
    import json
    from collections.abc import Awaitable, Callable
    from urllib.parse import quote

    import aiohttp
    import httpx
    import yarl
    from httpx_aiohttp import AiohttpTransport

    env = "env_http_layers"
    await emulator.enqueue(env, items)
    client = WorkApiClient(provider="anthropic", api_key=KEY, environment_id=env, base_url=emulator.url)
    last: dict[str, str] = {}
    for _ in range(items):
        work = await client.poll(block_ms=100)
        assert work is not None, "the emulator ran out of items"
        await client.ack(work.id)
        beat = await client.heartbeat(work.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=600)
        last[work.id] = beat.last_heartbeat
    headers = dict(client._headers)
    base = f"{emulator.url}/v1/environments/{env}/work/"

    def url(work_id: str, previous: str) -> str:
        return f"{base}{work_id}/heartbeat?expected_last_heartbeat={quote(previous, safe='')}&desired_ttl_seconds=600"

    session = aiohttp.ClientSession(trust_env=False)
    transport = AiohttpTransport(client=lambda: aiohttp.ClientSession(trust_env=False))
    plain = httpx.AsyncClient(
        headers=headers, transport=AiohttpTransport(client=lambda: aiohttp.ClientSession(trust_env=True))
    )
    env_free = httpx.AsyncClient(
        headers=headers, transport=AiohttpTransport(client=lambda: aiohttp.ClientSession(trust_env=False))
    )

    async def sidecar_client(work_id: str, previous: str) -> str:
        result = await client.heartbeat(work_id, expected_last_heartbeat=previous, desired_ttl_seconds=600)
        return result.last_heartbeat

    async def bare(work_id: str, previous: str) -> str:
        async with session.post(yarl.URL(url(work_id, previous), encoded=True), headers=headers) as answer:
            return str(json.loads(await answer.read())["last_heartbeat"])

    async def via_transport(work_id: str, previous: str) -> str:
        answer = await transport.handle_async_request(httpx.Request("POST", url(work_id, previous), headers=headers))
        return str(json.loads(await answer.aread())["last_heartbeat"])

    def via_client(http: httpx.AsyncClient) -> Callable[[str, str], Awaitable[str]]:
        async def beat(work_id: str, previous: str) -> str:
            return str((await http.post(url(work_id, previous))).json()["last_heartbeat"])

        return beat

    variants = {
        "sidecar's WorkApiClient (default backend, prebuilt URL and headers)": sidecar_client,
        "aiohttp ClientSession, nothing else": bare,
        "httpx.Request → httpx-aiohttp transport": via_transport,
        "httpx.AsyncClient → httpx-aiohttp, trust_env off": via_client(env_free),
        "httpx.AsyncClient → httpx-aiohttp, trust_env on": via_client(plain),
    }
    try:
        for name, variant in variants.items():
            ids, count = list(last), 0
            cpu_start, started = time.process_time(), time.monotonic()

            async def run(
                mine: list[str], beat: Callable[[str, str], Awaitable[str]] = variant, started: float = started
            ) -> None:
                nonlocal count
                turn = 0
                while time.monotonic() - started < seconds:
                    work_id = mine[turn % len(mine)]
                    turn += 1
                    last[work_id] = await beat(work_id, last[work_id])
                    count += 1

            await asyncio.gather(*(run(ids[k::concurrency]) for k in range(concurrency)))
            cpu = time.process_time() - cpu_start
            print(f"{cpu / count * 1000:5.2f} ms CPU per heartbeat   {name}", flush=True)
    finally:
        await client.aclose()
        await session.close()
        await transport.aclose()
        await plain.aclose()
        await env_free.aclose()


async def main(seconds: float, items: int, concurrency: int, by_layer: bool = False) -> None:
    emulator = await EmulatorProcess.start(default_ttl=600)
    try:
        if by_layer:
            await layers(emulator, items, seconds, concurrency)
            return
        for backend in HTTP_BACKENDS:
            print(await measure(emulator, backend, items, seconds, concurrency), flush=True)
    finally:
        await emulator.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.http_backends", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--layers", action="store_true", help="the cost of each layer instead (see above)")
    args = parser.parse_args()
    try:
        asyncio.run(main(args.seconds, args.items, args.concurrency, args.layers))
    finally:
        CHILDREN.kill_all()
