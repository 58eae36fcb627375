"""The plan of a run: which figure runs when, the progress bar, and the results document.

Timing-sensitive figures (emulator capacity, saturation, the sidecar's dispatch latency) run alone, one after the
other. The two lease holds are the long part; the timing-insensitive figures run during their windows:
the SDK's idle polls, its dispatch latency (seconds, set by its poll sleeps) and its long items during the first
hold, the sidecar's idle polls and long items during the second.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from . import fig_dispatch, fig_emulator, fig_idle, fig_leases, fig_lifecycle, report
from ._presets import Preset
from ._procs import CHILDREN, EmulatorProcess
from ._provenance import provenance

T = TypeVar("T")


class Progress:
    """A tqdm bar over the run's estimated seconds, labelled with the step in progress."""

    def __init__(self, total: float, enabled: bool = True) -> None:
        self.total = round(total)
        self.bar = tqdm(total=self.total, unit="s", disable=not enabled, dynamic_ncols=True, leave=True)
        self.started = time.monotonic()
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Progress:
        self._ticker = asyncio.ensure_future(self._tick())
        return self

    async def _tick(self) -> None:
        while True:
            elapsed = round(time.monotonic() - self.started)
            self.bar.n = min(elapsed, self.total - 1)
            self.bar.refresh()
            await asyncio.sleep(0.5)

    def step(self, name: str) -> None:
        self.bar.set_description_str(name)

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if exc[0] is None:
            self.bar.n = self.total
        self.bar.close()


def estimate_seconds(p: Preset) -> float:
    mean_gap = sum(p.dispatch_gap) / 2
    serial = p.emulator_seconds + 4 + 3
    serial += 2 * len(p.ns) * p.throughput_runs * (min(p.throughput_limit, p.throughput_items / 150) + 2)
    serial += 2 * len(p.ns) * (p.dispatch_items * mean_gap + 2) + 2 * 8
    holds = sum(max(s, p.long_hold) + c / 150 + 4 for c, s in zip(p.hold_counts, p.hold_seconds, strict=True))
    return serial + holds


async def _timed(progress: Progress, name: str, work: Callable[[], Awaitable[T]]) -> T:
    progress.step(name)
    return await work()


async def run(preset: Preset, out: Path, *, progress_bar: bool = True) -> dict[str, Any]:
    started_wall = datetime.now(UTC)
    started = time.monotonic()
    source = provenance()  # the code measured: recorded when the run starts
    load_start = [round(x, 2) for x in os.getloadavg()]
    figures: dict[str, Any] = {
        "idle_requests_per_minute": {"sidecar": {}, "sdk": {}},
        "dispatch_latency": {"sidecar": {}, "sdk": {}, "floor": {}},
        "burst": {},
        "requests_per_item": {"short": {"sidecar": {}, "sdk": {}}, "long": {}},
        "throughput": {"sidecar": {}, "sdk": {}},
        "leases_held": {},
    }
    emulator = await EmulatorProcess.start(default_ttl=preset.long_ttl)
    try:
        async with Progress(estimate_seconds(preset), progress_bar) as progress:
            progress.step("emulator heartbeat capacity")
            small = preset.name == "smoke"
            figures["emulator_heartbeat_capacity"] = await fig_emulator.heartbeat_capacity(
                emulator, preset.emulator_seconds, connections=4 if small else 64, items=8 if small else 256
            )
            progress.step("sidecar idle RSS")
            figures["sidecar_rss_idle"] = await fig_idle.idle_rss(emulator)
            for side, saturate in (("sidecar", fig_lifecycle.saturate_sidecar), ("sdk", fig_lifecycle.saturate_sdk)):
                for n in preset.ns:
                    progress.step(f"throughput {side} N={n}")
                    runs = [
                        await saturate(emulator, n, preset.throughput_items, preset.throughput_limit, attempt)
                        for attempt in range(preset.throughput_runs)
                    ]
                    run_ = fig_lifecycle.median_run(runs)
                    figures["throughput"][side][str(n)] = {k: v for k, v in run_.items() if k != "requests_per_item"}
                    figures["requests_per_item"]["short"][side][str(n)] = run_["requests_per_item"]
            for n in preset.ns:
                progress.step(f"dispatch sidecar N={n}")
                figures["dispatch_latency"]["sidecar"][str(n)] = await fig_dispatch.dispatch_sidecar(
                    emulator, n, preset
                )
                progress.step(f"dispatch floor (minimal client) N={n}")
                figures["dispatch_latency"]["floor"][str(n)] = await fig_dispatch.dispatch_floor(emulator, n, preset)
            progress.step(f"burst of {preset.burst_n} at N={preset.burst_n}")
            figures["burst"] = {
                "sidecar": await fig_dispatch.burst_sidecar(emulator, preset.burst_n),
                "sdk": await fig_dispatch.burst_sdk(emulator, preset.burst_n),
            }

            async def sdk_alongside() -> None:
                long = asyncio.ensure_future(
                    fig_lifecycle.long_sdk(emulator, preset.long_n, preset.long_hold, preset.long_ttl)
                )
                for n in preset.ns:
                    figures["dispatch_latency"]["sdk"][str(n)] = await fig_dispatch.dispatch_sdk(emulator, n, preset)
                for n in preset.ns:
                    figures["idle_requests_per_minute"]["sdk"][str(n)] = await fig_idle.idle_sdk(
                        emulator, n, preset.idle_seconds
                    )
                figures["requests_per_item"]["long"]["sdk"] = await long

            async def sidecar_alongside() -> None:
                long = asyncio.ensure_future(
                    fig_lifecycle.long_sidecar(emulator, preset.long_n, preset.long_hold, preset.long_ttl)
                )
                for n in preset.ns:
                    figures["idle_requests_per_minute"]["sidecar"][str(n)] = await fig_idle.idle_sidecar(
                        emulator, n, preset.idle_seconds
                    )
                figures["requests_per_item"]["long"]["sidecar"] = await long

            alongside = (sdk_alongside, sidecar_alongside)
            names = ("SDK dispatch, idle and long items", "sidecar idle and long items")
            for count, seconds, background, name in zip(
                preset.hold_counts, preset.hold_seconds, alongside, names, strict=True
            ):
                progress.step(f"{count:,} leases held (+ {name})")
                held, _ = await fig_leases.hold(
                    emulator, count, seconds, preset.hold_ttl, preset.hold_streams, background
                )
                figures["leases_held"][str(count)] = held
    finally:
        await emulator.close()
        CHILDREN.kill_all()
    results = {
        "meta": {
            **source,
            "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "preset": preset.name,
            "started": started_wall.strftime("%Y-%m-%d %H:%M UTC"),
            "duration_seconds": round(time.monotonic() - started, 1),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "anthropic": version("anthropic"),
            "ns": list(preset.ns),
            "preset_values": {k: v for k, v in vars(preset).items()},
        },
        "figures": figures,
        "notes": notes(preset),
    }
    report.write(results, out)
    return results


def notes(p: Preset) -> list[str]:
    hold_counts = " and ".join(f"{c:,}" for c in p.hold_counts)
    return [
        "Everything runs on loopback on one machine: the emulator (uvloop) and the sidecar each in their own "
        "process; sandboxes (grpc.aio, generated stubs only) in the harness process; SDK workers (one "
        "`EnvironmentWorker` with its own client each) as asyncio tasks in the harness process, except for "
        "throughput, where they run in processes of their own (one each up to 10, then 10 processes sharing them: "
        "bench/sdk_procs.py).",
        "SDK worker = `anthropic.lib.environments.EnvironmentWorker.run()` (its poll loop, ack, `_heartbeat_loop` "
        "and force-stop) with the session fetch and tool runner replaced by the bench handler, which waits for the "
        "lease's first heartbeat and then holds the item; dispatch for the SDK = the handler is called.",
        f"Idle: requests of the environment counted from the emulator's log over {p.idle_seconds:g} s after a settle, "
        "scaled to per minute (the harness's own stats calls excluded).",
        f"Dispatch: sidecar and floor: {p.dispatch_items} items per N, enqueued one at a time at gaps uniform in "
        f"{p.dispatch_gap[0]:g}-{p.dispatch_gap[1]:g} s (seed {p.seed}+N, the same gaps for both), each "
        "stopped at once; sidecar = WorkAssigned arrived (after poll, ack and the claiming heartbeat); floor = a "
        "minimal client's claiming heartbeat answered (bench/floor.py: N loops of poll → ack → heartbeat on one "
        "aiohttp session, nothing else). SDK: at random arrival phase, "
        f"{p.sdk_dispatch_items} items over up to {p.sdk_dispatch_envs} environments of N workers each (at most "
        f"{p.sdk_dispatch_workers} workers in all), fed in parallel at gaps uniform in "
        f"{p.sdk_dispatch_gap[0]:g}-{p.sdk_dispatch_gap[1]:g} s; SDK = its handler was called.",
        "Dispatch steps (p50, ms): from the emulator's request log (arrival and duration of each request) and the "
        "sandbox's clock on the same machine; the poll that returned an item is the latest answered poll that "
        "ended before its ack arrived.",
        f"Burst: {p.burst_n} items queued at once to {p.burst_n} idle sandboxes on one sidecar / {p.burst_n} SDK "
        "workers (asyncio tasks); time from the enqueue to the median and the last dispatch.",
        f"Short items and throughput: {p.throughput_items} items queued first, then N sandboxes/workers that stop "
        f"each item at once (runs end after {p.throughput_limit:g} s at most, or once every sandbox/worker has "
        f"finished an item, within {p.throughput_limit * fig_lifecycle.ROUND_LIMIT:g} s); items/s from their start to "
        "the last stop; requests per item from the emulator's log over the same window; sidecar CPU per Work API "
        "request = the sidecar process's CPU over the window ÷ the requests in it"
        + (
            f"; {p.throughput_runs} runs per side and N, each on a fresh environment (and sidecar), the figures "
            "are those of the run with the median items/s (every run's in latest.json)."
            if p.throughput_runs > 1
            else "."
        ),
        f"Long items: {p.long_n} sandboxes/workers each hold one item for {p.long_hold:g} s at TTL {p.long_ttl} "
        "(really held, not time-scaled), measured once at N = "
        f"{p.long_n}: the SDK's during the first lease hold, the sidecar's during the second.",
        f"Leases: {hold_counts} items at TTL {p.hold_ttl} held for "
        + " and ".join(f"{s:g} s" for s in p.hold_seconds)
        + f" by {p.hold_streams} WatchWork streams of one sidecar; the window starts once every item is held. "
        "The SDK's idle, dispatch and long-item runs share the first window, the sidecar's idle and long-item "
        "runs the second (other processes: their CPU is not the held sidecar's).",
        "Lateness = gap between consecutive heartbeats of an item (emulator arrival times) minus "
        "clamp(ttl/2, 1, 30) s; lost = items with a LeaseLost event, a heartbeat not answered 200, or not active "
        "at the end (each counted once).",
    ]
