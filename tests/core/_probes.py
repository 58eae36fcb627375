"""What a test may learn about a running sidecar, from the outside only: its public RPCs (GetQueueStats'
SidecarStats) and the emulator's request log (polls in flight, how many ran at once)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sidecar.work.v1 import work_service_pb2 as pb

from .conftest import Api, Running


async def sidecar_stats(running: Running) -> pb.SidecarStats:
    return (await running.stub.GetQueueStats(pb.GetQueueStatsRequest())).sidecar


async def free_capacity(running: Running) -> int:
    return (await sidecar_stats(running)).free_capacity


async def watchers(running: Running) -> int:
    return (await sidecar_stats(running)).watchers


async def polls_in_flight(api: Api) -> int:
    """Polls the emulator has received and not answered yet."""
    return sum(1 for entry in await api.requests("poll") if entry["status"] is None)


def peak_overlap(entries: list[dict[str, Any]]) -> int:
    """The most requests of `entries` that were open at the same instant (from arrival and duration)."""
    edges: list[tuple[float, int]] = []
    for entry in entries:
        start = datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()
        end = start + (entry["duration_ms"] / 1000 if entry.get("duration_ms") is not None else float("inf"))
        edges += [(start, 1), (end, -1)]
    peak = current = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):  # an end before a start at the same instant
        current += step
        peak = max(peak, current)
    return peak
