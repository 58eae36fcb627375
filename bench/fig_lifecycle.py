"""Figures 3 and 5: Work API requests per completed item, and full-lifecycle throughput at saturation.

Saturation (short items): `throughput_items` items are queued first, then N sandboxes / SDK workers start and stop
each item as soon as it is theirs (sidecar: poll → ack → claiming heartbeat → WorkAssigned → StopWork(force);
SDK: poll → ack → first heartbeat → handler returns → stop(force); one worker per *process* up to 10 (issue #13
compares with 10 SDK worker processes; 100 workers are 10 processes of 10), started and ready before the clock
starts). Items per second from the start of the sandboxes to the last stop;
requests per item from the emulator's log over the same window; the sidecar's CPU per Work API request = its process
CPU over the window ÷ the requests of the window.

With several runs per side and N (the full preset: 3), the figures are those of the run with the median items/s.

Long items: `long_n` items held `long_hold` seconds each at TTL `long_ttl` (full run: 10 items, 300 s, TTL 60,
so ten renewals each), counted the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from ._procs import Child, EmulatorProcess, LogEntry, count_operations, sidecar
from ._record import Recorder, started
from .baseline import sdk_fleet
from .sandboxes import fleet
from .sdk_procs import SdkProcesses

OPERATIONS = ("poll", "ack", "heartbeat", "stop")
ROUND_LIMIT = 4
"""A saturation window is extended until every sandbox / worker finished an item, up to this many windows."""


def _per_item(entries: list[LogEntry], env: str, until: float, done: int) -> dict[str, Any]:
    counts = count_operations((e for e in entries if e.at <= until), env)
    per = {op: counts.get(op, 0) / done for op in OPERATIONS} if done else dict.fromkeys(OPERATIONS, 0.0)
    others = sum(v for k, v in counts.items() if k not in OPERATIONS)
    per["other"] = others / done if done else 0.0
    return {"total": sum(per.values()), "by_operation": per, "requests": sum(counts.values()), "items": done}


async def _run(
    emulator: EmulatorProcess,
    env: str,
    items: int,
    limit: float,
    workers: int,
    start: Callable[[], AbstractAsyncContextManager[Recorder]],
    watched: Child | None,
    cpu_of: Callable[[], float] | None = None,
) -> dict[str, Any]:
    await emulator.enqueue(env, items)
    seq = await emulator.next_seq()
    cpu = watched.cpu_seconds() if watched else 0.0
    other_cpu = cpu_of() if cpu_of else 0.0
    emulator_cpu = emulator.child.cpu_seconds()
    started = time.monotonic()
    async with start() as recorder:
        if not await recorder.wait(lambda: len(recorder.stopped) >= items, within=limit):
            # A window shorter than one round of every worker's lifecycle measures the ramp-up, not throughput
            # (many workers on a loaded machine: every one polled and acked, none stopped yet). Extend it until
            # each worker could finish an item, within ROUND_LIMIT windows in all.
            one_round = min(items, workers)
            await recorder.wait(lambda: len(recorder.stopped) >= one_round, within=limit * (ROUND_LIMIT - 1))
        finished = max(recorder.stopped.values(), default=time.monotonic())
        wall_end = time.time() - (time.monotonic() - finished)
        elapsed = max(finished - started, 1e-6)
        done = len(recorder.stopped)
        result: dict[str, Any] = {
            "items": items,
            "completed": done,
            "seconds": round(elapsed, 3),
            "items_per_second": done / elapsed,
            "lost": recorder.lost,
            "stop_errors": recorder.stop_errors,
            "emulator_cores": (emulator.child.cpu_seconds() - emulator_cpu) / elapsed,
        }
        if watched is not None:
            result["sidecar_cpu_seconds"] = watched.cpu_seconds() - cpu
            result["sidecar_cores"] = result["sidecar_cpu_seconds"] / elapsed
        if cpu_of is not None:
            result["sdk_cores"] = (cpu_of() - other_cpu) / elapsed
    entries, _ = await emulator.requests(seq)
    result["requests_per_item"] = _per_item(entries, env, wall_end, done)
    requests = result["requests_per_item"]["requests"]
    if watched is not None and requests:
        result["sidecar_cpu_ms_per_request"] = result["sidecar_cpu_seconds"] / requests * 1000
    return result


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median items/s (the lower middle of an even count), and every run's headline figures."""
    ranked = sorted(runs, key=lambda run: run["items_per_second"])
    median = ranked[(len(ranked) - 1) // 2]
    if len(runs) == 1:
        return median
    keys = ("items_per_second", "sidecar_cpu_ms_per_request", "sidecar_cores", "sdk_cores")
    return {**median, "runs": [{k: run[k] for k in keys if k in run} for run in runs]}


async def saturate_sidecar(
    emulator: EmulatorProcess, n: int, items: int, limit: float, attempt: int = 0
) -> dict[str, Any]:
    env = f"env_saturate_sidecar_{n}" + (f"_{attempt}" if attempt else "")
    async with sidecar(emulator, env) as running:
        return await _run(emulator, env, items, limit, n, lambda: fleet(running.target, n), running.child)


async def saturate_sdk(emulator: EmulatorProcess, n: int, items: int, limit: float, attempt: int = 0) -> dict[str, Any]:
    env = f"env_saturate_sdk_{n}" + (f"_{attempt}" if attempt else "")
    workers = SdkProcesses(emulator.url, env, n)
    try:
        await workers.prepare()
        result = await _run(emulator, env, items, limit, n, lambda: started(workers), None, workers.cpu_seconds)
    finally:
        await workers.close()
    return {**result, "processes": workers.processes}


async def long_sidecar(emulator: EmulatorProcess, n: int, hold: float, ttl: int) -> dict[str, Any]:
    env = f"env_long_sidecar_{n}"
    async with sidecar(emulator, env, ttl=ttl) as running:
        result = await _run(emulator, env, n, hold + 120, n, lambda: fleet(running.target, n, hold=hold), running.child)
    return {**result, "hold_seconds": hold, "ttl_seconds": ttl}


async def long_sdk(emulator: EmulatorProcess, n: int, hold: float, ttl: int) -> dict[str, Any]:
    """The SDK asks for no TTL: the emulator is started with `--default-ttl` = `ttl`."""
    env = f"env_long_sdk_{n}"
    result = await _run(emulator, env, n, hold + 120, n, lambda: sdk_fleet(emulator.url, env, n, hold=hold), None)
    return {**result, "hold_seconds": hold, "ttl_seconds": ttl}
