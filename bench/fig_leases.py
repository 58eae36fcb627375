"""Figure 4: leases held. One sidecar holds `count` items at TTL `ttl` for `seconds`, for `streams` WatchWork
streams with max_in_flight = count / streams that never stop their items.

- lost: items that got LeaseLost, or a heartbeat the emulator did not answer 200, or are not `active` at the end
  (each item counted once; must be 0);
- heartbeat lateness: from the emulator's request log, for consecutive heartbeats of an item, the gap minus the
  expected interval clamp(ttl/2, 1, 30) (the sidecar schedules the next renewal one interval after an answer, so
  lateness = request time + scheduling delay);
- CPU: the sidecar's user+system CPU seconds over the window / the window (cores);
- RSS per lease: (RSS at the end of the window - RSS before the items came, with the streams open) / count.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.core import LeasePolicy

from ._procs import EmulatorProcess, LogEntry, percentile, sidecar
from .sandboxes import fleet

heartbeat_interval = LeasePolicy().heartbeat_interval  # the sidecar's own rule, not a copy of it


class _HeartbeatTracker:
    def __init__(self, env: str, interval: float) -> None:
        self.env = env
        self.interval = interval
        self.last: dict[str, float] = {}
        self.lateness: list[float] = []
        self.failed: set[str] = set()
        self.heartbeats = 0

    def feed(self, entries: list[LogEntry], window_start: float, window_end: float) -> None:
        for entry in entries:
            if entry.environment_id != self.env or entry.operation != "heartbeat" or entry.work_id is None:
                continue
            if entry.status != 200:
                if window_start <= entry.at <= window_end:
                    self.failed.add(entry.work_id)
                continue
            previous = self.last.get(entry.work_id)
            self.last[entry.work_id] = entry.at
            if previous is not None and window_start <= entry.at <= window_end:
                self.heartbeats += 1
                self.lateness.append(entry.at - previous - self.interval)


async def hold(
    emulator: EmulatorProcess,
    count: int,
    seconds: float,
    ttl: int,
    streams: int,
    alongside: Callable[[], Awaitable[Any]] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Hold the leases; run `alongside()` (timing-insensitive figures) during the window. Returns both results."""
    env = f"env_hold_{count}"
    per_stream = math.ceil(count / streams)
    async with sidecar(emulator, env, ttl=ttl) as running, fleet(running.target, streams, per_stream, hold=None) as f:
        await asyncio.sleep(1.0)  # settle the streams before the baseline RSS
        idle_rss = running.child.rss()
        fill_started = time.monotonic()
        for offset in range(0, count, 5000):
            await emulator.enqueue(env, min(5000, count - offset))
        await f.wait(lambda: len(f.assigned) >= count, within=600)
        fill_seconds = time.monotonic() - fill_started
        tracker = _HeartbeatTracker(env, heartbeat_interval(ttl))
        entries, seq = await emulator.requests(max(0, (await emulator.next_seq()) - 3 * count))
        background = asyncio.ensure_future(alongside()) if alongside is not None else None
        cpu = running.child.cpu_seconds()
        started, wall_start = time.monotonic(), time.time()
        tracker.feed(entries, wall_start, wall_start)  # the claims: each item's previous heartbeat
        rss_peak = 0
        timeline: list[dict[str, float | None]] = []
        mark, mark_cpu, mark_count = started, cpu, 0
        while (remaining := started + seconds - time.monotonic()) > 0:
            await asyncio.sleep(min(2.0, remaining))
            entries, seq = await emulator.requests(seq)
            tracker.feed(entries, wall_start, wall_start + seconds)
            rss_peak = max(rss_peak, running.child.rss())
            now = time.monotonic()
            if now - mark >= 10 or started + seconds - now <= 0:
                recent = [value * 1000 for value in tracker.lateness[mark_count:]]
                now_cpu = running.child.cpu_seconds()
                timeline.append(
                    {
                        "t": round(now - started, 1),
                        "sidecar_cores": round((now_cpu - mark_cpu) / (now - mark), 3),
                        "heartbeats": len(recent),
                        "lateness_p99_ms": percentile(recent, 99),
                        "lateness_max_ms": max(recent) if recent else None,
                        "loadavg_1m": os.getloadavg()[0],
                    }
                )
                mark, mark_cpu, mark_count = now, now_cpu, len(tracker.lateness)
        elapsed = time.monotonic() - started
        cores = (running.child.cpu_seconds() - cpu) / elapsed
        rss = running.child.rss()
        entries, seq = await emulator.requests(seq)
        tracker.feed(entries, wall_start, wall_start + seconds)
        items = await emulator.items(env)
        not_active = {item["id"] for item in items if item["state"] != "active"}
        lost = len(f.lost_ids | tracker.failed | not_active)
        late_ms = [value * 1000 for value in tracker.lateness]
        result = {
            "leases": count,
            "held": len(f.assigned),
            "ttl_seconds": ttl,
            "window_seconds": round(elapsed, 1),
            "streams": streams,
            "max_in_flight": per_stream,
            "fill_seconds": round(fill_seconds, 2),
            "fill_items_per_second": count / fill_seconds,
            "lost": lost,
            "lost_detail": {
                "lease_lost_events": f.lost,
                "failed_heartbeats": len(tracker.failed),
                "not_active": len(not_active),
            },
            "heartbeats_in_window": tracker.heartbeats,
            "expected_interval_seconds": tracker.interval,
            "lateness_p50_ms": percentile(late_ms, 50),
            "lateness_p99_ms": percentile(late_ms, 99),
            "lateness_max_ms": max(late_ms) if late_ms else None,
            "sidecar_cores": cores,
            "sidecar_cpu_ms_per_request": cores * elapsed / tracker.heartbeats * 1000 if tracker.heartbeats else None,
            "idle_rss_mb": idle_rss / 1e6,
            "rss_mb": rss / 1e6,
            "rss_peak_mb": max(rss_peak, rss) / 1e6,
            "rss_per_lease_kb": (rss - idle_rss) / count / 1024,
            "timeline": timeline,
        }
        side = await background if background is not None else None
    return result, side
