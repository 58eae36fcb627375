"""docs/benchmarks.md is generated from the committed results, and says where each figure comes from; a run of a
small preset never writes over the committed results."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

pytest.importorskip("matplotlib")

from bench import docs, report
from bench.__main__ import DEFAULT_OUT, SCRATCH, output_dir


def test_the_page_is_what_the_results_give() -> None:
    assert docs.PAGE.read_text() == docs.render(), "docs/benchmarks.md is stale: run .venv/bin/python -m bench.docs"


def test_every_run_on_the_page_names_its_commit_machine_and_load() -> None:
    page = docs.PAGE.read_text()
    latest = json.loads((docs.RESULTS / "latest.json").read_text())["meta"]
    for key in ("commit", "dirty", "cpu_model", "loadavg_start", "loadavg_end"):
        assert key in latest, f"latest.json does not record {key}"
    assert latest["commit"] in page and latest["cpu_model"] in page and "Load average" in page
    fleet = json.loads((docs.RESULTS / "fleet.json").read_text())["meta"]
    assert fleet["commit"] in page and f"{fleet['cpus']} CPUs, {fleet['cpu_model']}" in page
    assert "load average" in page.split("## One sidecar per pod", 1)[1].split("\n\n", 3)[2]


def test_quick_and_smoke_runs_go_to_ignored_scratch_directories() -> None:
    assert output_dir(None, quick=True, smoke=False) == SCRATCH["quick"] != DEFAULT_OUT
    assert output_dir(None, quick=False, smoke=True) == SCRATCH["smoke"] != DEFAULT_OUT
    assert output_dir(None, quick=False, smoke=False) == DEFAULT_OUT, "a full run writes the committed results"
    assert output_dir(DEFAULT_OUT, quick=True, smoke=False) == DEFAULT_OUT, "unless asked"
    for scratch in SCRATCH.values():
        assert scratch.parent == DEFAULT_OUT
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(scratch / "latest.json")], cwd=DEFAULT_OUT, check=False
        )
        assert ignored.returncode == 0, f"{scratch} is not git-ignored"


THROUGHPUT_AT_100 = "| throughput, full lifecycle (items/s) | 100 | "


def test_a_side_that_completed_nothing_says_so_instead_of_zeros() -> None:
    """A saturation window in which no item completed shows that, not "0.0 items/s, 0.00 (0+0+0+0)"."""
    results = json.loads((docs.RESULTS / "latest.json").read_text())
    broken = copy.deepcopy(results)
    run = broken["figures"]["throughput"]["sdk"]["100"]
    run.update(completed=0, items_per_second=0.0, seconds=3.0)
    per = broken["figures"]["requests_per_item"]["short"]["sdk"]["100"]
    per.update(total=0.0, items=0, by_operation=dict.fromkeys(("poll", "ack", "heartbeat", "stop", "other"), 0.0))
    text = report.markdown(broken)
    sidecar = next(line for line in report.markdown(results).splitlines() if line.startswith(THROUGHPUT_AT_100))
    assert f"{sidecar.rsplit(' | ', 1)[0]} | none completed in 3 s |" in text
    assert "- (none completed)" in text and "0.00 (0+0+0+0)" not in text
