"""The benchmark harness runs end to end on tiny sizes (`python -m bench --smoke`), so it cannot rot.

It asserts structure only (every figure present, with numbers, and the files written), never timings.
"""

from __future__ import annotations

import json
import numbers
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")


def _numbers(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for child in value.values() for leaf in _numbers(child)]
    if isinstance(value, list):
        return [leaf for child in value for leaf in _numbers(child)]
    return [value]


@pytest.mark.slow  # minutes of real processes: `make chaos` and .ci/run run it, `make test` does not
@pytest.mark.timeout(180)
def test_smoke_run_writes_every_figure(tmp_path: Path, short_dir: str) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # The harness's TMPDIR (short: its sidecars' Unix sockets live there); it must be left empty.
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-progress", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        env=os.environ | {"TMPDIR": short_dir},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not os.listdir(short_dir), f"the harness left files in TMPDIR: {os.listdir(short_dir)}"
    results = json.loads((tmp_path / "latest.json").read_text())
    figures = results["figures"]
    ns = [str(n) for n in results["meta"]["ns"]]
    for name in ("idle_requests_per_minute", "dispatch_latency", "throughput"):
        for side in ("sidecar", "sdk"):
            assert sorted(figures[name][side]) == sorted(ns), (name, side)
    for side in ("sidecar", "sdk"):
        for n in ns:
            assert isinstance(figures["idle_requests_per_minute"][side][n]["per_minute"], numbers.Real)
            dispatch = figures["dispatch_latency"][side][n]
            assert all(isinstance(dispatch[k], numbers.Real) for k in ("p50_ms", "p99_ms", "max_ms"))
            assert isinstance(figures["throughput"][side][n]["items_per_second"], numbers.Real)
            assert isinstance(figures["requests_per_item"]["short"][side][n]["total"], numbers.Real)
        assert isinstance(figures["requests_per_item"]["long"][side]["requests_per_item"]["total"], numbers.Real)
    assert figures["leases_held"], "no lease hold ran"
    # Issue #13: the floor, the dispatch steps, the burst, CPU per request, and where and what was measured.
    for n in ns:
        floor = figures["dispatch_latency"]["floor"][n]
        assert isinstance(floor["p50_ms"], numbers.Real)
        for side in ("sidecar", "floor"):
            steps = figures["dispatch_latency"][side][n]["steps"]
            assert len(steps) == 6 and all(isinstance(v, numbers.Real) for v in steps.values()), (side, steps)
        assert isinstance(figures["throughput"]["sidecar"][n]["sidecar_cpu_ms_per_request"], numbers.Real)
        assert figures["throughput"]["sdk"][n]["processes"] == min(int(n), 10)
        for side in ("sidecar", "sdk"):  # the smoke preset repeats each saturation run
            assert len(figures["throughput"][side][n]["runs"]) == 2, (side, n)
    for side in ("sidecar", "sdk"):
        assert figures["burst"][side]["received"] == figures["burst"][side]["items"]
    meta = results["meta"]
    assert meta["commit"] and isinstance(meta["dirty"], bool) and len(meta["loadavg_start"]) == 3
    assert meta["commit"] in (tmp_path / "latest.md").read_text()
    for held in figures["leases_held"].values():
        for key in ("lost", "lateness_p99_ms", "sidecar_cores", "rss_per_lease_kb", "idle_rss_mb"):
            assert isinstance(held[key], numbers.Real), key
    assert isinstance(figures["sidecar_rss_idle"]["rss_mb"], numbers.Real)
    assert isinstance(figures["emulator_heartbeat_capacity"]["heartbeats_per_second"], numbers.Real)
    assert len(results["targets"]) == 7 and all(isinstance(t["met"], bool) for t in results["targets"])
    assert all(leaf is not None for leaf in _numbers(figures)), "a figure has no value"
    markdown = (tmp_path / "latest.md").read_text()
    assert "| figure | N | work-sidecar | official SDK worker |" in markdown
    for png in ("idle_requests.png", "dispatch_latency.png", "throughput.png", "requests_per_item.png"):
        assert (tmp_path / png).stat().st_size > 1000, png
    assert (tmp_path / "leases_held.png").stat().st_size > 1000
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert not leftovers, f"the harness left processes behind: {leftovers}"


def test_the_median_run_is_chosen_by_items_per_second() -> None:
    from bench.fig_lifecycle import median_run

    runs = [
        {"items_per_second": v, "sidecar_cpu_ms_per_request": c, "x": i}
        for i, (v, c) in enumerate([(300.0, 0.4), (100.0, 0.9), (200.0, 0.6)])
    ]
    chosen = median_run(runs)
    assert chosen["x"] == 2 and chosen["sidecar_cpu_ms_per_request"] == 0.6
    assert [r["items_per_second"] for r in chosen["runs"]] == [300.0, 100.0, 200.0]  # in run order
    assert median_run(runs[:2])["x"] == 1  # an even count: the lower middle, never the better one
    assert median_run(runs[:1]) == runs[0]
