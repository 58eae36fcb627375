"""Issue #13 "honest figures": the README's benchmark section is the last full run's `latest.md`, verbatim."""

from __future__ import annotations

import json

from bench import readme


def test_the_readme_shows_latest_md_verbatim() -> None:
    assert readme.block(readme.README.read_text()) == readme.LATEST.read_text().strip("\n") + "\n", (
        "README.md's benchmark section differs from bench/results/latest.md: run `python -m bench.readme`"
    )


def test_latest_records_commit_machine_and_load() -> None:
    meta = json.loads((readme.LATEST.parent / "latest.json").read_text())["meta"]
    for key in ("commit", "dirty", "cpu_model", "loadavg_start", "loadavg_end"):
        assert key in meta, f"latest.json does not record {key}"
    text = readme.LATEST.read_text()
    assert meta["commit"] in text and "Load average" in text
