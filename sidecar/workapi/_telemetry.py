"""OpenTelemetry for Work API requests: one CLIENT span per attempt and a latency histogram.

Only the OpenTelemetry API is used here. With no SDK configured the global providers are no-ops, so
this costs next to nothing. Nothing secret is ever recorded: no headers, no query values, no bodies.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

from opentelemetry import metrics, trace
from opentelemetry.trace import INVALID_SPAN, ProxyTracer, ProxyTracerProvider, SpanKind, Status, StatusCode

_tracer = trace.get_tracer("sidecar.workapi")
_meter = metrics.get_meter("sidecar.workapi")
_latency = _meter.create_histogram(
    "work_sidecar.api.request.duration",
    unit="s",
    description="Work API request latency per operation (one sample per attempt)",
)
_errors = _meter.create_counter(
    "work_sidecar.api.errors", unit="{error}", description="Work API errors by operation and HTTP status"
)
_retries = _meter.create_counter(
    "work_sidecar.api.retries", unit="{retry}", description="Work API request attempts after the first"
)


class RequestSpan:
    """Wraps the span of one attempt so callers record outcomes without touching OTel types."""

    __slots__ = ("_operation", "_span", "_status")

    def __init__(self, span: trace.Span, operation: str) -> None:
        self._span = span
        self._operation = operation
        self._status = "error"

    def __enter__(self) -> RequestSpan:
        return self

    def __exit__(self, *_: object) -> None:
        return None

    def answered(self, status_code: int, request_id: str | None) -> None:
        self._status = str(status_code)
        self._span.set_attribute("http.response.status_code", status_code)
        if request_id:
            self._span.set_attribute("work_api.request_id", request_id)
        if status_code >= 400:
            self._span.set_status(Status(StatusCode.ERROR, f"HTTP {status_code}"))
            self._span.set_attribute("error.type", str(status_code))
            _errors.add(1, {"operation": self._operation, "status": self._status})

    def failed(self, error_type: str) -> None:
        self._status = "transport"
        self._span.set_status(Status(StatusCode.ERROR, error_type))
        self._span.set_attribute("error.type", error_type)
        _errors.add(1, {"operation": self._operation, "status": self._status})


_RECHECK_SECONDS = 1.0
_tracing: tuple[float, bool] = (-1.0, True)
"""(when to ask OpenTelemetry again, whether tracing was off when last asked)."""


def tracing_off() -> bool:
    """No tracer provider installed (the default: nothing configured): spans would be no-ops, so none is made
    (one per request is measurable at thousands of heartbeats per second). OpenTelemetry is asked at most once a
    second (asking reads the environment, measurable at saturation): a provider installed while
    requests run is used within a second; once one is installed it stays (OpenTelemetry allows no other)."""
    global _tracing
    if not isinstance(_tracer, ProxyTracer):
        return False
    now = time.monotonic()
    until, off = _tracing
    if now < until:
        return off
    off = isinstance(trace.get_tracer_provider(), ProxyTracerProvider)
    _tracing = (now + _RECHECK_SECONDS if off else math.inf, off)
    return off


def request_span(
    operation: str, method: str, route: str, provider: str, attempt: int
) -> AbstractContextManager[RequestSpan]:
    """The span of one attempt, current while the attempt runs. With tracing off: a RequestSpan that records the
    error counter only, and is its own context manager (no generator per request)."""
    if attempt > 1:
        _retries.add(1, {"operation": operation})
    if tracing_off():
        return RequestSpan(INVALID_SPAN, operation)
    return _traced_span(operation, method, route, provider, attempt)


@contextmanager
def _traced_span(operation: str, method: str, route: str, provider: str, attempt: int) -> Iterator[RequestSpan]:
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "url.template": route,
        "work_api.operation": operation,
        "work_api.provider": provider,
    }
    if attempt > 1:
        attributes["http.request.resend_count"] = attempt - 1
    with _tracer.start_as_current_span(
        f"{method} {route}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        # Neither the exception nor its text: an error's message may quote the Work API's, which may quote
        # the item's secret (#11). The outcome is set explicitly: "HTTP 412", "Timeout", "ResponseError".
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield RequestSpan(span, operation)


def record_latency(operation: str, seconds: float) -> None:
    _latency.record(seconds, {"operation": operation})
