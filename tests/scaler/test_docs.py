"""docs/scaler.md stays true to the code: its tables of trigger metadata keys, flags and metrics are generated from
the code's own definitions (tools/scaler_docs.py), and this test fails when the page is stale."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from sidecar.scaler import SCALER_FLAGS
from sidecar.scaler._metadata import KEDA_KEYS, METADATA_KEYS
from sidecar.scaler._telemetry import INSTRUMENTS

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaler_docs", ROOT / "tools" / "scaler_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scaler_docs", module)
    spec.loader.exec_module(module)
    return module


def test_generated_tables_are_current() -> None:
    text = (ROOT / "docs" / "scaler.md").read_text()
    assert _tool().render(text) == text, "docs/scaler.md is stale: run .venv/bin/python tools/scaler_docs.py"


def test_the_page_names_every_key_flag_and_metric() -> None:
    text = (ROOT / "docs" / "scaler.md").read_text()
    for key in METADATA_KEYS:
        assert f"| `{key.name}` |" in text, key.name
    for flag in SCALER_FLAGS:
        assert f"| `{flag.name}` | `{flag.env}` |" in text, flag.name
    for instrument in INSTRUMENTS:
        assert f"`{instrument.name}`" in text, instrument.name
    for keda_key in KEDA_KEYS - {"scalerAddress"}:
        assert f"`{keda_key}`" in text, keda_key


def test_a_stale_table_is_caught() -> None:
    text = (ROOT / "docs" / "scaler.md").read_text()
    stale = text.replace("| `includeInProgress` |", "| `includeInProgres` |")
    assert stale != text
    assert _tool().render(stale) != stale
