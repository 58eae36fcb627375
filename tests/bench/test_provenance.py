"""A result records whether the code it measured had uncommitted changes; the runners' own outputs are not such
changes (`make bench` runs the fleet after the main bench rewrote its results)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench._provenance import OUTPUTS, provenance


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t", *args], check=True)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for output in OUTPUTS:
        path = tmp_path / output / "latest.md" if "." not in Path(output).name else tmp_path / output
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("old\n")
    (tmp_path / "sidecar").mkdir()
    (tmp_path / "sidecar" / "code.py").write_text("old\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "initial")
    monkeypatch.chdir(tmp_path / "sidecar")  # from a subfolder too
    return tmp_path


def test_rewritten_results_are_not_uncommitted_code(repo: Path) -> None:
    for written in [*repo.glob("*/results/latest.md"), *repo.glob("docs/*.md")]:
        written.write_text("new\n")
    assert provenance()["dirty"] is False


def test_a_changed_source_file_is(repo: Path) -> None:
    (repo / "sidecar" / "code.py").write_text("new\n")
    assert provenance()["dirty"] is True
