"""Figures 1 and 6: idle Work API requests per minute (no work queued), and the sidecar's idle RSS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ._procs import EmulatorProcess, count_operations, sidecar
from .baseline import sdk_fleet
from .sandboxes import fleet


async def _count(emulator: EmulatorProcess, environment_id: str, window: float) -> dict[str, Any]:
    seq = await emulator.next_seq()
    started = time.monotonic()
    await asyncio.sleep(window)  # the measured window itself, not a synchronisation
    entries, _ = await emulator.requests(seq)
    elapsed = time.monotonic() - started
    counts = count_operations(entries, environment_id)
    total = sum(counts.values())
    return {"requests": total, "seconds": round(elapsed, 2), "per_minute": total / elapsed * 60, "by_operation": counts}


async def idle_sidecar(emulator: EmulatorProcess, n: int, window: float) -> dict[str, Any]:
    """N sandboxes (max_in_flight 1) watch a sidecar on an empty queue."""
    env = f"env_idle_sidecar_{n}"
    async with sidecar(emulator, env) as running, fleet(running.target, n):
        await asyncio.sleep(min(2.0, window))  # let the first poll open (steady state)
        result = await _count(emulator, env, window)
        result["sidecar_rss_mb"] = running.child.rss() / 1e6
        return result


async def idle_sdk(emulator: EmulatorProcess, n: int, window: float) -> dict[str, Any]:
    """N SDK workers poll an empty queue."""
    env = f"env_idle_sdk_{n}"
    async with sdk_fleet(emulator.url, env, n):
        await asyncio.sleep(min(2.0, window))
        return await _count(emulator, env, window)


async def idle_rss(emulator: EmulatorProcess, settle: float = 1.0) -> dict[str, Any]:
    """RSS of a freshly started sidecar with no sandbox (it polls nothing)."""
    async with sidecar(emulator, "env_idle_rss") as running:
        await asyncio.sleep(settle)
        return {"rss_mb": running.child.rss() / 1e6, "settle_seconds": settle}
