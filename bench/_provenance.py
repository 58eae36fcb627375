"""What a result was measured on: the commit (and whether the tree had uncommitted changes) and the machine.

Recorded by every runner that writes results (`bench`, `bench --fleet`, `chaos`): a figure is true for the code
that produced it. The runners' own outputs do not count as changes: `make bench` runs the fleet after the main
bench has rewritten its results.
"""

from __future__ import annotations

import contextlib
import platform
import subprocess
from typing import Any

OUTPUTS = ("bench/results", "chaos/results", "docs/benchmarks.md", "docs/chaos.md")
"""What the runners write, relative to the repository's top: not uncommitted code."""


def provenance() -> dict[str, Any]:
    """The commit measured (and whether the tree had uncommitted changes), and the machine."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "commit": git("rev-parse", "--short=12", "HEAD").strip() or "unknown",
        "dirty": bool(
            git(
                "status", "--porcelain", "--untracked-files=no", "--", ":/", *(f":(top,exclude){p}" for p in OUTPUTS)
            ).strip()
        ),
        "host": platform.node(),
        "cpu_model": cpu_model or platform.processor() or "unknown",
        "kernel": platform.release(),
    }
