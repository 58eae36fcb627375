"""The lowest versions pyproject.toml allows for the generated code's runtimes can import that code.

Generated code checks its runtime: `*_pb2.py` refuses a protobuf older than the protoc that made it, and
`*_pb2_grpc.py` a grpcio older than its grpcio-tools. A lower bound below those would install and then fail at
import. This test installs exactly the floors (from PyPI, into a scratch directory) and imports the package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FLOORED = ("protobuf", "grpcio")


def _floor(name: str) -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for spec in dependencies:
        found = re.fullmatch(rf"{name}\s*>=\s*([0-9.]+)\s*,.*", spec.split(";")[0].strip())
        if found:
            return found.group(1)
    raise AssertionError(f"pyproject.toml has no lower bound for {name}")


def test_the_generated_code_names_the_floors() -> None:
    generated = ROOT / "sidecar" / "work" / "v1"
    protoc = re.search(r"# Protobuf Python Version: ([0-9.]+)", (generated / "work_service_pb2.py").read_text())
    tools = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (generated / "work_service_pb2_grpc.py").read_text())
    assert protoc and tools
    assert _floor("protobuf") == protoc.group(1), "protobuf's floor is the version that generated the code"
    assert _floor("grpcio") == tools.group(1), "grpcio's floor is the grpcio-tools that generated the code"


@pytest.mark.timeout(300)
def test_the_lowest_allowed_versions_import_the_generated_code(tmp_path: Path) -> None:
    target = tmp_path / "floor"
    pins = [f"{name}=={_floor(name)}" for name in FLOORED]
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), *pins],
        capture_output=True,
        text=True,
        timeout=280,
    )
    if install.returncode != 0 and "No matching distribution" in install.stderr:
        pytest.fail(f"the floor versions are not installable: {install.stderr[-500:]}")
    assert install.returncode == 0, install.stderr[-2000:]
    probe = (
        "import google.protobuf, grpc, sys;"
        "from sidecar.work.v1 import work_service_pb2, work_service_pb2_grpc;"
        "print(google.protobuf.__version__, grpc.__version__)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [_floor(name) for name in FLOORED], "the floors, not the venv's, were imported"
