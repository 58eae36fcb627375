"""The README documents every `serve` flag with its environment variable (the table is the contract)."""

from __future__ import annotations

from pathlib import Path

from sidecar.cli import SERVE_FLAGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = README[:400]
    assert "make run" in head
    assert "make test" in head


def test_every_flag_is_in_the_configuration_table() -> None:
    for flag in SERVE_FLAGS:
        assert f"| `{flag.name}` | `{flag.env}` |" in README, f"{flag.name} is missing from the README table"
