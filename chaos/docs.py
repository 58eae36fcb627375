"""The generated parts of `docs/chaos.md`: the scenario list (from `chaos.scenarios.SCENARIOS`) and the latest
results table (from `chaos/results/latest.json`), each between a pair of HTML comment markers.

`python -m chaos docs` rewrites them (a full run into `chaos/results/` does it too); `tests/chaos/test_docs_page.py`
fails while the page differs from what they would be.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "chaos.md"
LATEST = Path(__file__).resolve().parent / "results" / "latest.json"
COLUMNS = ("items", "completed", "lost", "duplicated", "reworked", "stranded", "leaked", "errors")


def _marked(name: str) -> tuple[str, str]:
    return f"<!-- generated:{name} (python -m chaos docs) -->", f"<!-- end:{name} -->"


def scenarios() -> str:
    """One line per scenario: its name, its faults, and whether `--quick` leaves it out."""
    lines = []
    for s in SCENARIOS:
        quick = " (full run only)" if s.full_only else ""
        lines.append(f"- **{s.name}**{quick}: {s.what}.")
    return "\n".join(lines)


def results(latest: dict[str, Any]) -> str:
    """The latest run's table, with the commit it ran on."""
    dirty = " (with uncommitted changes)" if latest.get("dirty") else ""
    moved = latest.get("commit_at_end")
    moved_note = f" (HEAD moved to `{moved}` during the run)" if moved not in (None, latest.get("commit")) else ""
    out = [
        f"`make chaos` ({latest['mode']}) on {latest['started']}, commit `{latest.get('commit', 'unknown')}`"
        f"{dirty}{moved_note}: {latest['minutes']:.1f} min on {latest['cpus']} CPUs "
        f"({latest.get('cpu_model', 'unknown CPU')}), seed {latest['seed']}, {latest['phase']:g} s of faults per "
        "scenario.",
        "",
        "| scenario | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for row in latest["scenarios"]:
        out.append(f"| {row['scenario']} | " + " | ".join(str(row.get(c, "—")) for c in COLUMNS) + " |")
    fuzz = latest.get("fuzz")
    if fuzz:
        failures = sum(len(r["failures"]) for r in fuzz["rpcs"])
        examples = sum(r["examples"] for r in fuzz["rpcs"])
        out += ["", f"gRPC input fuzzing: {examples} examples over {len(fuzz['rpcs'])} RPC forms, {failures} failures."]
    return "\n".join(out)


def render(page: str, latest: dict[str, Any]) -> str:
    """`page` with both generated parts replaced."""
    for name, text in (("scenarios", scenarios()), ("results", results(latest))):
        begin, end = _marked(name)
        head, found, rest = page.partition(begin)
        if not found or end not in rest:
            raise ValueError(f"{PAGE.name} has no {begin} … {end} markers")
        _old, _, tail = rest.partition(end)
        page = f"{head}{begin}\n{text}\n{end}{tail}"
    return page


def update(page: Path = PAGE, latest: Path = LATEST) -> bool:
    """Rewrite the generated parts; True when the page changed."""
    old = page.read_text()
    new = render(old, json.loads(latest.read_text()))
    if new != old:
        page.write_text(new)
    return new != old
