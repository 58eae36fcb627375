"""The generated packages (sidecar/work/, sidecar/keda/) must be exactly what `make proto` makes from proto/."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    fresh = gen_proto.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    stale = []
    for path in fresh:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.exists() or committed.read_bytes() != path.read_bytes():
            stale.append(str(rel))
    committed_files = {
        p.relative_to(ROOT)
        for package in gen_proto.GENERATED_PACKAGES
        for p in (ROOT / package).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    extra = committed_files - {p.relative_to(tmp_path) for p in fresh}
    assert not stale, f"generated code is stale, run `make proto`: {stale}"
    assert not extra, f"files in the generated package that protoc does not make: {sorted(map(str, extra))}"


def test_every_generated_package_is_covered(tmp_path: Path) -> None:
    """Both generated packages come out of one run, and KEDA's service keeps KEDA's full name."""
    fresh = {p.relative_to(tmp_path).parts[:2] for p in gen_proto.generate(tmp_path)}
    assert fresh == {package.parts for package in gen_proto.GENERATED_PACKAGES}
    from sidecar.keda import externalscaler_pb2

    service = externalscaler_pb2.DESCRIPTOR.services_by_name["ExternalScaler"]
    assert service.full_name == "externalscaler.ExternalScaler"
    assert [m.name for m in service.methods] == [
        "IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics", "StreamMetricSpec",
    ]  # fmt: skip
