"""The fleet simulation (`python -m bench --fleet --smoke`) runs end to end: K sidecar processes, the scaler and
the emulator. Asserts structure and the invariants (every item dispatched, none held by two sandboxes at once,
the scaler answered and saw the burst), never timings."""

from __future__ import annotations

import json
import numbers
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("matplotlib")


@pytest.mark.slow  # minutes of real processes: `make chaos` and .ci/run run it, `make test` does not
@pytest.mark.timeout(180)
def test_fleet_smoke_run(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--fleet", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "fleet.json").read_text())
    runs = results["runs"]
    assert [run["k"] for run in runs] == list(results["meta"]["ks"])
    for run in runs:
        assert run["items_held_by_two_at_once"] == 0 and run["lost"] == 0
        for pattern in ("burst", "trickle"):
            assert run[pattern]["completed"] and run[pattern]["dispatched"] == run[pattern]["items"], pattern
            assert isinstance(run[pattern]["p50_ms"], numbers.Real) and isinstance(run[pattern]["p99_ms"], numbers.Real)
        assert run["idle"]["fleet_per_minute"] > 0 and run["idle"]["scaler_stats_per_minute"] > 0
        assert "stats" not in run["idle"]["by_operation"], "the scaler's reads are counted apart"
        scaler = run["scaler"]
        assert scaler["samples"] and scaler["errors"] == 0
        assert scaler["max_replicas"] >= 1, "the burst showed in the scaler's metric"
        assert scaler["final_replicas"] == 0, "back to zero once the queue is empty"
        assert set(run["phases"]) == {"idle", "burst", "trickle"}
    assert "| K | fleet idle requests/min |" in (tmp_path / "fleet.md").read_text()
    # Issue #13, one-sandbox pods: K sidecars (without and with --idle-poll-gap) vs K SDK workers.
    pods = results["pods"]
    assert [run["k"] for run in pods] == list(results["meta"]["ks"])
    for run in pods:
        for side in ("sidecar", "sidecar_gap", "sdk"):
            # the SDK and the sidecar with --idle-poll-gap may send nothing in a smoke-sized idle window (both wait
            # seconds after an empty poll); a sidecar without the gap always long-polls
            assert run[side]["idle_per_minute"] > 0 or side in ("sdk", "sidecar_gap"), side
            assert run[side]["dispatched"] == run[side]["items"], side
            assert isinstance(run[side]["p50_ms"], numbers.Real) and isinstance(run[side]["p99_ms"], numbers.Real)
    assert "One-sandbox pods" in (tmp_path / "fleet.md").read_text()
    assert (tmp_path / "fleet_replicas.png").stat().st_size > 1000
    # The ScaledJob after a burst: every item done by some Job; Jobs that found none ended (exit 0) on --idle-exit.
    for run in results["jobs"]:
        assert run["items_stopped"] and run["jobs_with_an_item"] == run["items"], run
        assert run["jobs_created"] == run["jobs_with_an_item"] + run["idle_jobs"]
        assert len(run["idle_seconds"]) == run["idle_jobs"] and set(run["idle_job_exit_codes"]) <= {0}, run
        assert all(seconds >= results["meta"]["job_idle_exit"] for seconds in run["idle_seconds"]), run
    assert "ScaledJob after a burst" in (tmp_path / "fleet.md").read_text()
    leftovers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()]
    assert not leftovers, f"the fleet left processes behind: {leftovers}"
