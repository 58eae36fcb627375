"""Telemetry set-up for the process, from the standard `OTEL_*` environment variables.

- Exporters: `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` = `otlp`, `console` or `none` (comma lists
  allowed). When unset they default to `otlp` if an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set, else to none.
  `OTEL_EXPORTER_OTLP_PROTOCOL` (or the per-signal variable) picks `grpc` (default) or `http/protobuf`;
  endpoints, headers, timeouts and intervals are read by the exporters themselves, the resource
  (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) by the SDK.
- `--metrics-listen host:port` adds a Prometheus scrape endpoint.
- With nothing configured the OpenTelemetry API keeps its no-op providers: telemetry off costs next to
  nothing, and no gRPC server interceptor is installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import metrics, trace

from . import __version__

# The SDK is imported only when an exporter is configured: with telemetry off the process never loads it.
if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("sidecar.telemetry")

_state: dict[str, bool] = {"tracing": False}


def tracing_enabled() -> bool:
    """True once setup_telemetry installed a real tracer provider (the gRPC interceptor is added then)."""
    return _state["tracing"]


def _names(variable: str, environ: Mapping[str, str], signal: str) -> list[str]:
    raw = environ.get(variable, "").strip().lower()
    if not raw:
        endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = [name.strip() for name in raw.split(",") if name.strip()]
    return [] if names == ["none"] else [n for n in names if n != "none"]


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    return (
        environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (otlp, console or none)")
    if _protocol(environ, "TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter()


def _metric_reader(name: str, environ: Mapping[str, str]) -> MetricReader:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if name == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if name != "otlp":
        raise ValueError(f"OTEL_METRICS_EXPORTER: unsupported exporter {name!r} (otlp, console or none)")
    if _protocol(environ, "METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return PeriodicExportingMetricReader(HttpMetricExporter())
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return PeriodicExportingMetricReader(GrpcMetricExporter())


def _prometheus(address: str) -> MetricReader:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1")
    reader: MetricReader = PrometheusMetricReader()
    return reader


def _resource(environ: Mapping[str, str]) -> Resource:
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource

    name = environ.get("OTEL_SERVICE_NAME", "work-sidecar")
    return Resource.create({SERVICE_NAME: name, SERVICE_VERSION: __version__})


@contextmanager
def setup_telemetry(metrics_listen: str | None = None, environ: Mapping[str, str] | None = None) -> Iterator[None]:
    """Install OpenTelemetry providers from the OTEL_* variables (and a Prometheus endpoint on `metrics_listen`)
    for the duration of the block; with nothing configured, install nothing."""
    environ = os.environ if environ is None else environ
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    span_exporters = [_span_exporter(name, environ) for name in _names("OTEL_TRACES_EXPORTER", environ, "TRACES")]
    if span_exporters:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=_resource(environ))
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        _state["tracing"] = True
    readers = [_metric_reader(name, environ) for name in _names("OTEL_METRICS_EXPORTER", environ, "METRICS")]
    if metrics_listen:
        readers.append(_prometheus(metrics_listen))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=_resource(environ), metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
    if tracer_provider or meter_provider:
        log.info(
            "telemetry on",
            extra={"traces": bool(tracer_provider), "metric_readers": len(readers), "prometheus": metrics_listen},
        )
    try:
        yield
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()
        _state["tracing"] = False
