"""Regenerate the tables of docs/scaler.md from the code: the trigger metadata keys (`sidecar.scaler._metadata`),
the flags (`sidecar.scaler._cli`) and the metrics (`sidecar.scaler._telemetry`).

    .venv/bin/python tools/scaler_docs.py          # rewrite the tables in place
    .venv/bin/python tools/scaler_docs.py --check  # exit 1 when the page is stale (tests/scaler/test_docs.py)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sidecar.scaler._cli import markdown_flags  # noqa: E402
from sidecar.scaler._metadata import markdown_table as metadata_table  # noqa: E402
from sidecar.scaler._telemetry import markdown_table as metrics_table  # noqa: E402

PAGE = ROOT / "docs" / "scaler.md"
TABLES: dict[str, Callable[[], str]] = {"metadata": metadata_table, "flags": markdown_flags, "metrics": metrics_table}


def block(name: str) -> re.Pattern[str]:
    start, end = rf"<!-- generated: {name} \(tools/scaler_docs.py\) -->\n", rf"^<!-- end: {name} -->"
    return re.compile(f"({start})(.*?)({end})", re.S | re.M)


def render(text: str) -> str:
    for name, table in TABLES.items():
        pattern = block(name)
        if not pattern.search(text):
            raise SystemExit(f"{PAGE}: no generated block {name!r}")
        text = pattern.sub(lambda m, table=table: m.group(1) + table() + "\n" + m.group(3), text)  # type: ignore[misc]
    return text


def main(argv: list[str]) -> int:
    text = PAGE.read_text()
    fresh = render(text)
    if "--check" in argv:
        return 0 if fresh == text else 1
    PAGE.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
