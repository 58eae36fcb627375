"""docs/configuration.md is what `make config-docs` makes from the flag definitions: every option of every command,
its environment variables and default. The page fails this test as soon as a flag changes without it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen_config_docs  # noqa: E402

from sidecar import _flags  # noqa: E402

GENERATOR = ROOT / "tools" / "gen_config_docs.py"


def _check(page: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--check", "--page", str(page)],
        capture_output=True, text=True, timeout=60, check=False, env={**os.environ, **env},
    )  # fmt: skip


def test_the_committed_page_is_fresh_whatever_the_environment() -> None:
    """Run as `make config-docs` runs it, with variables set that some parsers read when they are built."""
    result = _check(gen_config_docs.PAGE, WORK_SIDECAR_ADDR="unix:///tmp/elsewhere.sock", WORK_SIDECAR_TTL="5")
    assert result.returncode == 0, result.stderr


def test_a_stale_page_is_refused(tmp_path: Path) -> None:
    page = tmp_path / "configuration.md"
    page.write_text(gen_config_docs.render().replace("WORK_SIDECAR_TTL", "WORK_SIDECAR_LEASE_TTL"), encoding="utf-8")
    result = _check(page)
    assert result.returncode == 1 and "make config-docs" in result.stderr


def test_every_option_its_variables_and_default_are_on_the_page() -> None:
    page = gen_config_docs.render()
    for command, (parser, flags) in gen_config_docs._parsers().items():
        section = page.split(f"## `work-sidecar {command}`", 1)[1].split("\n## ", 1)[0]
        options = [
            max(action.option_strings, key=len)
            for action in parser._actions
            if action.option_strings and not isinstance(action, argparse._HelpAction)
        ]
        assert options, command
        for name in options:
            assert f"| `{name}` |" in section, f"{command} {name}"
        for flag in flags:
            [row] = [line for line in section.splitlines() if line.startswith(f"| `{flag.name}` |")]
            for variable in flag.env_names:
                assert f"`{variable}`" in row, (command, flag.name, variable)
            default = flag.default_value
            if not (default is None or default is False or default == "" or default == []):
                assert f"`{_flags.shown(default)}`" in row, (command, flag.name, default)
