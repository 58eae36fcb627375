"""Generate the Python code for proto/ into the generated-API packages: sidecar/work/ (the sidecar's
WorkService) and sidecar/keda/ (KEDA's external scaler API, served by `work-sidecar scaler`).

`make proto` runs this; tests/test_generated.py runs it into a temporary folder and fails when the
committed code differs, so the generated package can never drift from the .proto files.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
GENERATED_PACKAGES = (Path("sidecar") / "work", Path("sidecar") / "keda")


def init_text(package: Path) -> str:
    return f'"""Generated from proto/{package.as_posix()}: do not edit, run `make proto`."""\n'


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules below out_dir (which plays the role of the repo root)."""
    well_known = str(resources.files("grpc_tools") / "_proto")
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    bin_dir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside this interpreter
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    generated: list[Path] = []
    for relative in GENERATED_PACKAGES:
        package = out_dir / relative
        for folder in [package, *[p for p in package.rglob("*") if p.is_dir()]]:
            (folder / "__init__.py").write_text(init_text(relative))
        (package / "py.typed").write_text("")
        generated += [p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return sorted(generated)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root folder to generate into")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path.relative_to(ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
