"""`docs/chaos.md` shows every scenario and the committed results: its generated parts are what `python -m chaos
docs` would write from `chaos.scenarios` and `chaos/results/latest.json` (this test fails while they are stale)."""

from __future__ import annotations

import json

import pytest

from chaos import docs


def test_the_chaos_page_is_up_to_date() -> None:
    page = docs.PAGE.read_text()
    latest = json.loads(docs.LATEST.read_text())
    assert docs.render(page, latest) == page, "docs/chaos.md is stale: run `.venv/bin/python -m chaos docs`"


def test_the_page_names_every_scenario_and_the_commit_of_the_results() -> None:
    page = docs.PAGE.read_text()
    latest = json.loads(docs.LATEST.read_text())
    assert latest["commit"] in page
    for row in latest["scenarios"]:
        assert f"| {row['scenario']} |" in page


def test_render_refuses_a_page_without_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        docs.render("# no markers", json.loads(docs.LATEST.read_text()))
