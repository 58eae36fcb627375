"""docs/telemetry.md's metric reference is generated from the instrument declarations: it fails here when stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sidecar import _instruments
from sidecar.core import _telemetry as _core  # noqa: F401 - declares the core's instruments
from sidecar.workapi import _telemetry as _workapi  # noqa: F401 - declares the Work API client's instruments

ROOT = Path(__file__).resolve().parent.parent


def test_the_metric_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_telemetry_docs.py"), "--check"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr or result.stdout


def test_every_instrument_says_what_it_measures_and_durations_are_seconds() -> None:
    page = (ROOT / "docs" / "telemetry.md").read_text()
    assert _instruments.CATALOG, "the instruments are declared through sidecar._instruments"
    for metric in _instruments.CATALOG.values():
        assert metric.description and metric.unit, metric
        assert f"`{metric.prometheus_name}`" in page, metric.name
        if metric.kind == "histogram":
            assert metric.unit == "s" and metric.prometheus_name.endswith("_seconds"), metric
            assert metric.buckets == _instruments.SECONDS_BUCKETS, metric
