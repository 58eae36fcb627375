"""Telemetry set-up for the process, from the standard `OTEL_*` environment variables.

- Exporters (comma lists allowed), every value the OpenTelemetry specification defines either works or is
  refused in one line (`TelemetryError`; the CLI exits 2):
  - `OTEL_TRACES_EXPORTER`: `otlp`, `console`, `none`; `zipkin`, `jaeger` and `logging` are refused.
  - `OTEL_METRICS_EXPORTER`: `otlp`, `prometheus` (a scrape endpoint on `OTEL_EXPORTER_PROMETHEUS_HOST`:`_PORT`,
    default localhost:9464), `console`, `none`; `logging` is refused.
  - `OTEL_LOGS_EXPORTER`: `console` (the log lines on stderr, which are always written) and `none`; `otlp` and
    `logging` are refused.
  When unset, traces and metrics default to `otlp` if an `OTEL_EXPORTER_OTLP_*ENDPOINT` is set, else to none.
  `OTEL_EXPORTER_OTLP_PROTOCOL` (or the per-signal variable) picks `grpc` (default) or `http/protobuf`;
  endpoints, headers, timeouts and intervals are read by the exporters themselves, the resource
  (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`) by the SDK.
- `--metrics-listen host:port` adds a Prometheus scrape endpoint (the same registry as `prometheus`).
- With nothing configured the OpenTelemetry API keeps its no-op providers: telemetry off costs next to
  nothing, and no gRPC server interceptor is installed.
- The instruments themselves are declared in `sidecar._instruments` (docs/telemetry.md is generated from them).
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


class TelemetryError(ValueError):
    """An `OTEL_*` setting the process cannot honour, or a metrics endpoint it cannot open (one line: the fix)."""


EXPORTERS: dict[str, tuple[str, ...]] = {
    "OTEL_TRACES_EXPORTER": ("otlp", "console", "none"),
    "OTEL_METRICS_EXPORTER": ("otlp", "prometheus", "console", "none"),
    "OTEL_LOGS_EXPORTER": ("console", "none"),
}
"""What each variable takes here. A log line always goes to stderr (`console`); `none` is accepted for it too."""

REFUSED: dict[str, str] = {
    "zipkin": "work-sidecar ships no Zipkin exporter: set otlp and let an OpenTelemetry Collector forward to Zipkin",
    "jaeger": "deprecated by the OpenTelemetry specification (Jaeger takes OTLP): set otlp",
    "logging": "deprecated by the OpenTelemetry specification: set console",
    "otlp": "work-sidecar writes its logs to stderr (--log-format json: one object a line): collect them from there, "
    "or set console",
    "prometheus": "Prometheus takes metrics only: set OTEL_METRICS_EXPORTER=prometheus",
}
"""Values the OpenTelemetry specification defines that are refused here, with the reason (logs: `otlp` too)."""

PROMETHEUS_HOST = "localhost"
PROMETHEUS_PORT = 9464
"""The specification's defaults for OTEL_EXPORTER_PROMETHEUS_HOST and _PORT."""


def exporter_names(variable: str, environ: Mapping[str, str]) -> list[str]:
    """The exporters `variable` names, checked: a value not supported here raises TelemetryError."""
    signal = variable.removeprefix("OTEL_").removesuffix("_EXPORTER")
    raw = environ.get(variable, "").strip().lower()
    if not raw:
        if signal == "LOGS":
            return []
        endpoint = environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return ["otlp"] if endpoint else []
    names = list(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    supported = EXPORTERS[variable]
    for name in names:
        if name not in supported:
            reason = REFUSED.get(name, f"not an exporter the OpenTelemetry specification defines for {signal.lower()}")
            raise TelemetryError(f"{variable}={name} is not supported ({', '.join(supported)}): {reason}")
    if signal == "LOGS":
        return []  # console: the log lines on stderr, as always
    return [name for name in names if name != "none"]


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    variable = next(
        (
            name
            for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
            if environ.get(name)
        ),
        None,
    )
    protocol = environ[variable].strip() if variable else "grpc"
    if protocol not in ("grpc", "http/protobuf"):
        raise TelemetryError(
            f"{variable}={protocol} is not supported (grpc or http/protobuf)"
            + (": the OTLP exporters here speak protobuf, not JSON" if protocol == "http/json" else "")
        )
    return protocol


def _span_exporter(name: str, environ: Mapping[str, str]) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if _protocol(environ, "TRACES") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter

        return HttpSpanExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter

    return GrpcSpanExporter()


def _metric_reader(name: str, environ: Mapping[str, str]) -> MetricReader:
    from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

    if name == "console":
        return PeriodicExportingMetricReader(ConsoleMetricExporter())
    if _protocol(environ, "METRICS") == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpMetricExporter

        return PeriodicExportingMetricReader(HttpMetricExporter())
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcMetricExporter

    return PeriodicExportingMetricReader(GrpcMetricExporter())


def prometheus_addresses(metrics_listen: str | None, names: list[str], environ: Mapping[str, str]) -> list[str]:
    """Where to serve /metrics: `--metrics-listen`, and OTEL_EXPORTER_PROMETHEUS_HOST:_PORT when
    OTEL_METRICS_EXPORTER names prometheus (the same address once)."""
    addresses = [metrics_listen] if metrics_listen else []
    if "prometheus" in names:
        host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", "").strip() or PROMETHEUS_HOST
        raw_port = environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "").strip() or str(PROMETHEUS_PORT)
        if not raw_port.isdigit() or not 0 <= int(raw_port) <= 65535:
            raise TelemetryError(f"OTEL_EXPORTER_PROMETHEUS_PORT={raw_port} is not a port number (0-65535)")
        address = f"[{host}]:{raw_port}" if ":" in host else f"{host}:{raw_port}"
        if address not in addresses:
            addresses.append(address)
    return addresses


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise TelemetryError(f"--metrics-listen takes host:port, not {address!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _prometheus(addresses: list[str], metrics_listen: str | None) -> MetricReader:
    """One reader (one registry), served on each address (an error names `--metrics-listen` when the address is
    the flag's, else the OTEL_EXPORTER_PROMETHEUS_* variables)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import start_http_server

    for address in addresses:
        host, port = _split(address)
        try:
            start_http_server(port, addr=host)
        except OSError as exc:
            source = "--metrics-listen" if address == metrics_listen else "OTEL_EXPORTER_PROMETHEUS_HOST/_PORT"
            raise TelemetryError(
                f"cannot serve Prometheus metrics on {address} ({source}): {exc.strerror or exc}: "
                "choose another address"
            ) from None
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
    exporter_names("OTEL_LOGS_EXPORTER", environ)  # checked only: log lines go to stderr
    metric_names = exporter_names("OTEL_METRICS_EXPORTER", environ)
    span_exporters = [_span_exporter(name, environ) for name in exporter_names("OTEL_TRACES_EXPORTER", environ)]
    readers = [_metric_reader(name, environ) for name in metric_names if name != "prometheus"]
    addresses = prometheus_addresses(metrics_listen, metric_names, environ)
    if addresses:
        readers.append(_prometheus(addresses, metrics_listen))
    if span_exporters:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=_resource(environ))
        for exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(tracer_provider)
        _state["tracing"] = True
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=_resource(environ), metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
    if tracer_provider or meter_provider:
        log.info(
            "telemetry on",
            extra={"traces": bool(tracer_provider), "metric_readers": len(readers), "prometheus": addresses},
        )
    try:
        yield
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()
        _state["tracing"] = False
