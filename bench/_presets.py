"""Sizes of a run: the full benchmark, `--quick`, and the tiny `--smoke` preset the test suite runs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    ns: tuple[int, ...]
    """Sandboxes (sidecar) / workers (SDK) per scenario."""
    idle_seconds: float
    """Window over which idle Work API requests are counted."""
    dispatch_items: int
    dispatch_gap: tuple[float, float]
    """Items arrive at seeded-random gaps in this range (seconds)."""
    throughput_items: int
    throughput_limit: float
    """A saturation run ends after this many seconds even if not every item is done."""
    long_n: int
    long_hold: float
    long_ttl: int
    hold_counts: tuple[int, ...]
    hold_seconds: tuple[float, ...]
    hold_ttl: int
    hold_streams: int
    emulator_seconds: float
    sdk_dispatch_gap: tuple[float, float] = (0.5, 5.0)
    """The SDK's items arrive at gaps longer than its idle cycle (poll + 1-3 s sleep): each at an independent
    phase."""
    sdk_dispatch_items: int = 200
    """SDK dispatch at random arrival phase: this many items in all (issue #13: at least 200) …"""
    sdk_dispatch_envs: int = 20
    """… over at most this many environments of N workers each, in parallel …"""
    sdk_dispatch_workers: int = 400
    """… and at most this many SDK workers in all (fewer environments at large N)."""
    throughput_runs: int = 1
    """Saturation runs per side and N; the figures are the run with the median items/s (the machine's speed
    drifts by tens of percent within minutes: one 6 s run is one draw of it)."""
    burst_n: int = 100
    """Burst: this many items queued at once to this many idle sandboxes / SDK workers."""
    seed: int = 20260701


FULL = Preset(
    name="full",
    ns=(1, 10, 100),
    idle_seconds=20.0,
    dispatch_items=40,  # the p50 of 20 moved by ±0.5 ms between runs
    dispatch_gap=(0.5, 2.0),
    throughput_items=2000,
    throughput_limit=6.0,
    long_n=10,
    long_hold=300.0,
    long_ttl=60,
    hold_counts=(1000, 10_000),
    hold_seconds=(300.0, 300.0),
    hold_ttl=60,
    hold_streams=100,
    emulator_seconds=5.0,
    throughput_runs=3,
)

QUICK = Preset(
    name="quick",
    ns=(1, 10, 100),
    idle_seconds=5.0,
    dispatch_items=5,
    dispatch_gap=(0.1, 0.6),
    throughput_items=300,
    throughput_limit=3.0,
    long_n=10,
    long_hold=20.0,
    long_ttl=10,
    hold_counts=(200, 1000),
    hold_seconds=(20.0, 20.0),
    hold_ttl=10,
    hold_streams=20,
    emulator_seconds=2.0,
    sdk_dispatch_gap=(0.3, 2.0),
    sdk_dispatch_items=40,
    sdk_dispatch_envs=8,
    sdk_dispatch_workers=200,
)

SMOKE = Preset(
    name="smoke",
    ns=(1, 3),
    idle_seconds=1.5,
    dispatch_items=2,
    dispatch_gap=(0.05, 0.2),
    throughput_items=20,
    throughput_limit=3.0,
    long_n=2,
    long_hold=3.0,
    long_ttl=2,
    hold_counts=(10, 20),
    hold_seconds=(3.0, 3.0),
    hold_ttl=2,
    hold_streams=5,
    emulator_seconds=1.0,
    throughput_runs=2,  # the repeat path runs in the suite too
    sdk_dispatch_gap=(0.05, 0.2),
    sdk_dispatch_items=4,
    sdk_dispatch_envs=2,
    sdk_dispatch_workers=4,
    burst_n=3,
)

PRESETS = {preset.name: preset for preset in (FULL, QUICK, SMOKE)}
