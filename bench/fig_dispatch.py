"""Figure 2: dispatch latency, item enqueued → the sandbox holds it, with items at seeded-random gaps.

Sidecar: the sandbox's WorkAssigned arrived (after poll, ack and the claiming heartbeat). Floor: the minimal client
(bench/floor.py) got its claiming heartbeat's answer. SDK: its worker called the item handler (after poll and ack;
its first heartbeat runs alongside). Each item is stopped at once.

The SDK's dispatch depends on where in its poll/sleep cycle an item lands (it sleeps 1-3 s after an empty poll), so
it is measured at random arrival phase with `sdk_dispatch_items` (≥ 200) items: several environments of N workers
each, in parallel, every one fed at seeded-random gaps (so the run takes seconds, not the items' sum of gaps).

The sidecar's and the floor's dispatch is broken into its steps from the emulator's request log (arrival and
duration of each request) and the sandbox's clock (same machine): queued → poll answered → ack arrived → ack
answered → claim arrived → claim answered → WorkAssigned read by the sandbox.

Burst: `n` items queued at once to N idle sandboxes / SDK workers: time until the last (and the median) is
dispatched.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

from ._presets import Preset
from ._procs import EmulatorProcess, LogEntry, percentile, sidecar
from ._record import Recorder
from .baseline import sdk_fleet
from .floor import floor_fleet
from .sandboxes import fleet

STEPS = (
    ("queued → poll answered", "queued", "poll_end"),
    ("poll answered → ack sent", "poll_end", "ack_at"),
    ("ack sent → ack answered", "ack_at", "ack_end"),
    ("ack answered → claim sent", "ack_end", "claim_at"),
    ("claim sent → claim answered", "claim_at", "claim_end"),
    ("claim answered → in the sandbox", "claim_end", "assigned"),
)


async def _trickle(
    emulator: EmulatorProcess, env: str, recorder: Recorder, preset: Preset, seed: int, items: int | None = None
) -> dict[str, Any]:
    rng = random.Random(seed)
    sent: dict[str, float] = {}
    queued_wall: dict[str, float] = {}
    seq = await emulator.next_seq()
    for _ in range(items or preset.dispatch_items):
        await asyncio.sleep(rng.uniform(*preset.dispatch_gap))
        started, wall = time.monotonic(), time.time()
        [work_id] = await emulator.enqueue(env)
        sent[work_id] = started
        queued_wall[work_id] = wall
    await recorder.wait(lambda: all(work_id in recorder.assigned for work_id in sent), within=60)
    latencies = [(recorder.assigned[w] - t) * 1000 for w, t in sent.items() if w in recorder.assigned]
    entries, _ = await emulator.requests(seq)
    return {
        **_summary(latencies),
        "items": len(sent),
        "gap_seconds": list(preset.dispatch_gap),
        "seed": seed,
        "steps": _steps(entries, env, queued_wall, recorder.assigned_wall),
    }


def _summary(latencies: list[float]) -> dict[str, Any]:
    return {
        "received": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else None,
    }


def _steps(
    entries: list[LogEntry], env: str, queued: dict[str, float], assigned: dict[str, float]
) -> dict[str, float | None]:
    """p50 (ms) of each step of dispatch, per STEPS. The poll that returned an item: the latest answered poll of
    the environment that ended before the item's ack arrived and after it was queued."""
    mine = [e for e in entries if e.environment_id == env]
    polls = [e for e in mine if e.operation == "poll" and e.status == 200]
    per_step: dict[str, list[float]] = {name: [] for name, _, _ in STEPS}
    for work_id, queued_at in queued.items():
        ack = next((e for e in mine if e.operation == "ack" and e.work_id == work_id), None)
        claim = next((e for e in mine if e.operation == "heartbeat" and e.work_id == work_id), None)
        if ack is None or claim is None or work_id not in assigned:
            continue
        returned = [p for p in polls if queued_at <= p.end <= ack.at]
        if not returned:
            continue
        poll = max(returned, key=lambda p: p.end)
        times = {
            "queued": queued_at,
            "poll_end": poll.end,
            "ack_at": ack.at,
            "ack_end": ack.end,
            "claim_at": claim.at,
            "claim_end": claim.end,
            "assigned": assigned[work_id],
        }
        for name, start, end in STEPS:
            per_step[name].append((times[end] - times[start]) * 1000)
    return {name: percentile(values, 50) for name, values in per_step.items()}


async def dispatch_sidecar(emulator: EmulatorProcess, n: int, preset: Preset) -> dict[str, Any]:
    env = f"env_dispatch_sidecar_{n}"
    async with sidecar(emulator, env) as running, fleet(running.target, n) as sandboxes:
        return await _trickle(emulator, env, sandboxes, preset, preset.seed + n)


async def dispatch_floor(emulator: EmulatorProcess, n: int, preset: Preset) -> dict[str, Any]:
    env = f"env_dispatch_floor_{n}"
    async with floor_fleet(emulator.url, env, n) as loops:
        return await _trickle(emulator, env, loops, preset, preset.seed + n)


async def dispatch_sdk(emulator: EmulatorProcess, n: int, preset: Preset) -> dict[str, Any]:
    """At random arrival phase: `envs` environments of n SDK workers, each fed its share of the items."""
    envs = max(1, min(preset.sdk_dispatch_envs, preset.sdk_dispatch_workers // n))
    per_env = math.ceil(preset.sdk_dispatch_items / envs)

    results = await asyncio.gather(*(_sdk_env(emulator, n, preset, i, per_env) for i in range(envs)))
    latencies = [value for values in results for value in values]
    return {
        **_summary(latencies),
        "items": envs * per_env,
        "environments": envs,
        "workers_per_environment": n,
        "gap_seconds": list(preset.sdk_dispatch_gap),
        "seed": preset.seed + n * 1000,
    }


async def _sdk_env(emulator: EmulatorProcess, n: int, preset: Preset, index: int, items: int) -> list[float]:
    env = f"env_dispatch_sdk_{n}_{index}"
    rng = random.Random(preset.seed + n * 1000 + index)
    async with sdk_fleet(emulator.url, env, n) as workers:
        await asyncio.sleep(rng.uniform(0, 3))  # environments start out of step with each other
        sent: dict[str, float] = {}
        for _ in range(items):
            await asyncio.sleep(rng.uniform(*preset.sdk_dispatch_gap))
            started = time.monotonic()
            [work_id] = await emulator.enqueue(env)
            sent[work_id] = started
        await workers.wait(lambda: all(w in workers.assigned for w in sent), within=60)
        return [(workers.assigned[w] - t) * 1000 for w, t in sent.items() if w in workers.assigned]


async def _burst(emulator: EmulatorProcess, env: str, recorder: Recorder, count: int) -> dict[str, Any]:
    await asyncio.sleep(1.5)  # idle: every loop in its idle rhythm
    started = time.monotonic()
    ids = await emulator.enqueue(env, count)
    await recorder.wait(lambda: all(w in recorder.assigned for w in ids), within=60)
    latencies = [(recorder.assigned[w] - started) * 1000 for w in ids if w in recorder.assigned]
    return {**_summary(latencies), "items": count, "all_ms": max(latencies) if len(latencies) == count else None}


async def burst_sidecar(emulator: EmulatorProcess, n: int) -> dict[str, Any]:
    env = f"env_burst_sidecar_{n}"
    async with sidecar(emulator, env) as running, fleet(running.target, n) as sandboxes:
        return await _burst(emulator, env, sandboxes, n)


async def burst_sdk(emulator: EmulatorProcess, n: int) -> dict[str, Any]:
    env = f"env_burst_sdk_{n}"
    async with sdk_fleet(emulator.url, env, n) as workers:
        return await _burst(emulator, env, workers, n)
