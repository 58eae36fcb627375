"""The fenced shell blocks of README.md and docs/*.md, and how a page's blocks are run as typed.

A block is ```bash, ```sh, ```shell or ```console (in a console block, the lines after a `$ ` prompt are the
commands). It is run unless the line just before its fence is `<!-- not-run: REASON -->`. A page's runnable blocks
run in order in one bash (`set -e -o pipefail`), from a checkout of the repository whose `.venv/bin` is the tested
virtualenv's, after `make run` (examples/python/demo.py, what it runs) has started. Every command is run word for
word but for the addresses: `make run`'s (`127.0.0.1:50051`, `localhost:8787`, `/tmp/work-sidecar*`) and the other
ports in `PORTS` become this run's own, so pages run side by side with each other and with a real `make run`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHELLS = frozenset({"bash", "sh", "shell", "console"})
NOT_RUN = re.compile(r"^<!-- not-run: (?P<reason>.*?) -->$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
PORTS = (8788, 8789, 6000, 9464, 50052, 50061, 8797)
"""Ports the pages use beside `make run`'s, each replaced by a free one per run."""


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    text: str
    not_run: str | None
    """The reason it is not run, or None when it is run."""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def commands(self) -> str:
        if self.lang != "console":
            return self.text
        lines, previous = [], ""
        for line in self.text.splitlines():
            if line.startswith("$ ") or previous.endswith("\\"):
                lines.append(line.removeprefix("$ "))
                previous = line
        return "\n".join(lines) + "\n"


def blocks(page: Path) -> list[Block]:
    """Every fenced shell block of `page`, in order."""
    found: list[Block] = []
    lines = page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((j for j in range(index + 1, len(lines)) if lines[j].startswith("```")), len(lines))
        lang = opening["lang"]
        if lang in SHELLS:
            marker = NOT_RUN.match(lines[index - 1].strip()) if index else None
            text = "\n".join(lines[index + 1 : end]) + "\n"
            found.append(Block(page, index + 1, lang, text, marker["reason"].strip() if marker else None))
        index = end + 1
    return found


@dataclass(frozen=True)
class Addresses:
    """Where this run's `make run` listens, and the ports and paths that stand in for the pages' others."""

    tcp: str
    emulator_port: int
    tmp: Path
    """A short directory standing in for /tmp (Unix socket paths have a length limit)."""
    ports: dict[int, int]

    def apply(self, text: str) -> str:
        text = text.replace("127.0.0.1:50051", self.tcp).replace("localhost:50051", self.tcp)
        for host in ("localhost", "127.0.0.1"):
            text = text.replace(f"{host}:8787", f"{host}:{self.emulator_port}")
        text = re.sub(r"/tmp/(work-sidecar[\w.-]*)", lambda found: f"{self.tmp}/{found[1]}", text)
        for port, ours in self.ports.items():
            text = re.sub(rf"(?<=[:\s]){port}\b", str(ours), text)
        return text
