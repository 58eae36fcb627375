"""The client's request telemetry (`sidecar/workapi/_telemetry.py`): spans only when a tracer provider exists."""

from __future__ import annotations

import time

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import INVALID_SPAN

from sidecar.workapi import _telemetry


def test_a_tracer_provider_installed_while_requests_run_is_used_within_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With none installed no span is made (asking OpenTelemetry is cached for a second, issue #13); one installed
    later is picked up once the second has passed, and from then on the answer never changes."""
    monkeypatch.setattr(_telemetry, "_tracing", (-1.0, True))
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    assert _telemetry.tracing_off()
    with _telemetry.request_span("stats", "GET", "/stats", "anthropic", 1) as span:
        assert span._span is INVALID_SPAN
    provider = TracerProvider()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    deadline = time.monotonic() + 3 * _telemetry._RECHECK_SECONDS
    while _telemetry.tracing_off():
        assert time.monotonic() < deadline, "the new tracer provider was not noticed"
        time.sleep(0.05)
    monkeypatch.setattr(trace, "get_tracer_provider", trace.ProxyTracerProvider)
    assert not _telemetry.tracing_off()  # once on, it stays on
