"""Figure 2: dispatch latency, item enqueued → the sandbox holds it, with items at seeded-random gaps.

Sidecar: the sandbox's WorkAssigned arrived (after poll, ack and the claiming heartbeat). SDK: its worker called the
item handler (after poll and ack; its first heartbeat runs alongside). Each item is stopped at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from ._presets import Preset
from ._procs import EmulatorProcess, percentile, sidecar
from ._record import Recorder
from .baseline import sdk_fleet
from .sandboxes import fleet


async def _trickle(
    emulator: EmulatorProcess, env: str, recorder: Recorder, preset: Preset, seed: int
) -> dict[str, Any]:
    rng = random.Random(seed)
    sent: dict[str, float] = {}
    for _ in range(preset.dispatch_items):
        await asyncio.sleep(rng.uniform(*preset.dispatch_gap))
        started = time.monotonic()
        [work_id] = await emulator.enqueue(env)
        sent[work_id] = started
    await recorder.wait(lambda: all(work_id in recorder.assigned for work_id in sent), within=60)
    latencies = [(recorder.assigned[w] - t) * 1000 for w, t in sent.items() if w in recorder.assigned]
    return {
        "items": len(sent),
        "received": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies) if latencies else None,
        "gap_seconds": list(preset.dispatch_gap),
        "seed": seed,
    }


async def dispatch_sidecar(emulator: EmulatorProcess, n: int, preset: Preset) -> dict[str, Any]:
    env = f"env_dispatch_sidecar_{n}"
    async with sidecar(emulator, env) as running, fleet(running.target, n) as sandboxes:
        return await _trickle(emulator, env, sandboxes, preset, preset.seed + n)


async def dispatch_sdk(emulator: EmulatorProcess, n: int, preset: Preset) -> dict[str, Any]:
    env = f"env_dispatch_sdk_{n}"
    async with sdk_fleet(emulator.url, env, n) as workers:
        return await _trickle(emulator, env, workers, preset, preset.seed + n)
