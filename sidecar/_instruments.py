"""The metric instruments, declared once: name, kind, unit, labels, description and histogram bucket boundaries.

Every instrument of the sidecar is made through `counter`, `histogram` or `Gauge` here, so `CATALOG` lists them
all with what they mean; docs/telemetry.md is generated from it (`python tools/gen_telemetry_docs.py`) and a
test fails when the page is stale. Only the OpenTelemetry API is used: with no SDK set up the instruments are
no-ops.

Durations are in seconds, recorded into explicit `SECONDS_BUCKETS` (from a millisecond to a day), never into
OpenTelemetry's default boundaries (which assume milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Observation

Kind = Literal["counter", "histogram", "gauge", "observable counter"]

SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0,
)  # fmt: skip
"""Bucket boundaries of every duration histogram: a millisecond (a dispatch) to a day (the longest item)."""

_PROMETHEUS_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes"}


@dataclass(frozen=True)
class Metric:
    """One instrument as an operator sees it."""

    scope: str
    """The OpenTelemetry meter (instrumentation scope) that makes it."""
    name: str
    kind: Kind
    unit: str
    description: str
    labels: Mapping[str, str] = field(default_factory=dict)
    """Attribute name -> what its values are."""
    buckets: tuple[float, ...] = ()
    """Explicit histogram bucket boundaries (histograms only)."""

    @property
    def prometheus_name(self) -> str:
        """The name the Prometheus exporter gives it: dots to underscores, the unit as a suffix (annotations such
        as `{item}` dropped), `_total` on counters."""
        name = self.name.replace(".", "_").replace("-", "_")
        suffix = _PROMETHEUS_UNITS.get(self.unit, "")
        if suffix and not name.endswith(f"_{suffix}"):
            name += f"_{suffix}"
        if self.kind in ("counter", "observable counter"):
            name += "_total"
        return name


CATALOG: dict[str, Metric] = {}
"""Every declared instrument by name, in declaration order."""


def _declare(metric: Metric) -> Metric:
    known = CATALOG.get(metric.name)
    if known is not None and known != metric:
        raise ValueError(f"instrument {metric.name} declared twice, differently")
    CATALOG[metric.name] = metric
    return metric


def counter(scope: str, name: str, unit: str, description: str, labels: Mapping[str, str] | None = None) -> Counter:
    _declare(Metric(scope, name, "counter", unit, description, dict(labels or {})))
    return metrics.get_meter(scope).create_counter(name, unit=unit, description=description)


def histogram(
    scope: str,
    name: str,
    description: str,
    labels: Mapping[str, str] | None = None,
    *,
    unit: str = "s",
    buckets: tuple[float, ...] = SECONDS_BUCKETS,
) -> Histogram:
    _declare(Metric(scope, name, "histogram", unit, description, dict(labels or {}), buckets))
    return metrics.get_meter(scope).create_histogram(
        name, unit=unit, description=description, explicit_bucket_boundaries_advisory=list(buckets)
    )


Reading = Callable[[], Iterable[tuple[float, Mapping[str, str]]]]
"""A callback's readings: (value, attributes) pairs."""


class Gauge:
    """An observable instrument declared at import; `observe` registers its callback once the values exist."""

    def __init__(
        self,
        scope: str,
        name: str,
        unit: str,
        description: str,
        labels: Mapping[str, str] | None = None,
        *,
        kind: Kind = "gauge",
    ) -> None:
        self.metric = _declare(Metric(scope, name, kind, unit, description, dict(labels or {})))

    def observe(self, read: Callable[[], float] | Reading) -> None:
        """Register `read`: a number, or (value, attributes) pairs."""

        def callback(_: CallbackOptions) -> Iterable[Observation]:
            value = read()
            if isinstance(value, int | float):
                yield Observation(value)
                return
            for reading, attributes in value:
                yield Observation(reading, dict(attributes))

        metric = self.metric
        meter = metrics.get_meter(metric.scope)
        if metric.kind == "observable counter":
            meter.create_observable_counter(metric.name, [callback], unit=metric.unit, description=metric.description)
        else:
            meter.create_observable_gauge(metric.name, [callback], unit=metric.unit, description=metric.description)
