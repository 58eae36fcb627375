"""Shared by the example tests: toolchain checks that skip (or, in CI, fail) with a reason. (The fixtures of
tests/core, a real emulator and in-process sidecars, come from tests/conftest.py.)

A test that needs a toolchain outside the virtualenv calls `require_tool("node", "why")`: when it is missing the
test is skipped with the reason and the hint `make polyglot-deps`, except when WORK_SIDECAR_REQUIRE_POLYGLOT is
set (CI sets it in .ci/run), where a missing toolchain fails the test instead of hiding it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import pytest

__all__ = ["ROOT", "require", "require_path", "require_tool"]

ROOT = Path(__file__).resolve().parents[2]
REQUIRE_ENV = "WORK_SIDECAR_REQUIRE_POLYGLOT"

# Where tools are looked for after PATH: the virtualenv's bin (grpcurl, work-sidecar) and the repo's npm tools
# (buf), as `make` puts both on PATH and a bare `pytest` run may not.
EXTRA_PATHS = (Path(sys.executable).parent, ROOT / "node_modules" / ".bin")


def require(condition: object, reason: str) -> None:
    """Skip the test with `reason` unless `condition` holds; fail instead when WORK_SIDECAR_REQUIRE_POLYGLOT is set."""
    if not condition:
        _missing(reason)


def _missing(reason: str) -> NoReturn:
    message = f"{reason} (run make polyglot-deps)"
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{message}; {REQUIRE_ENV} is set, so a missing toolchain fails instead of skipping", pytrace=False)
    pytest.skip(message)


def require_tool(name: str, why: str) -> str:
    """The path of executable `name` (PATH, then .venv/bin and node_modules/.bin), or skip/fail saying `why`."""
    found = shutil.which(name) or shutil.which(name, path=os.pathsep.join(str(p) for p in EXTRA_PATHS))
    if found is None:
        _missing(f"{name} is not installed: {why}")
    return found


def require_path(path: Path, why: str) -> Path:
    """`path` if it exists, or skip/fail saying `why` (for toolchain parts that are files, not executables)."""
    if not path.exists():
        _missing(f"{path} is missing: {why}")
    return path
