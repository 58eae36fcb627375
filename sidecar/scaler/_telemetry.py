"""The scaler's own metrics and spans, through the OpenTelemetry API only (no-ops until `setup_telemetry`
installs an SDK: the same `OTEL_*` settings and `--metrics-listen` as `serve`).

`INSTRUMENTS` declares every instrument (docs/scaler.md's metrics table is generated from it). Environment ids
label only the readings of environments that have been read (at most `ScalerConfig.max_environments` of them, see
`_readings.py`); errors and latencies carry bounded labels only (the RPC, a gRPC code, an error class).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind

if TYPE_CHECKING:
    from ._readings import Readings

LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
"""Seconds: from an answer out of the cached reading to a call that waited for a first read."""


@dataclass(frozen=True, slots=True)
class Instrument:
    name: str
    kind: str
    unit: str
    description: str
    attributes: tuple[str, ...] = ()


RPC_DURATION = Instrument(
    "work_sidecar.scaler.rpc.duration", "histogram", "s",
    "Time to answer a KEDA call (StreamIsActive: to its first answer)", ("rpc", "code"),
)  # fmt: skip
RPC_ERRORS = Instrument(
    "work_sidecar.scaler.rpc.errors", "counter", "{call}", "KEDA calls answered with an error", ("rpc", "code")
)
READ_ERRORS = Instrument(
    "work_sidecar.scaler.read.errors", "counter", "{read}",
    "Failed reads of the Work API (stats, and the list when items in progress are counted)", ("error",),
)  # fmt: skip
READING_ITEMS = Instrument(
    "work_sidecar.scaler.reading.items", "gauge", "{item}",
    "The latest reading per environment: `queued` (waiting), `pending` (polled, not acknowledged), "
    "`in_progress` (acknowledged or leased; only while a trigger sets includeInProgress)",
    ("environment_id", "state"),
)  # fmt: skip
READING_AGE = Instrument(
    "work_sidecar.scaler.reading.age", "gauge", "s",
    "Seconds since the latest successful read of each environment (grows while reads fail)", ("environment_id",),
)  # fmt: skip
ENVIRONMENTS = Instrument(
    "work_sidecar.scaler.environments", "gauge", "{environment}", "Environments being read (each holds a slot)"
)
INSTRUMENTS = (RPC_DURATION, RPC_ERRORS, READ_ERRORS, READING_ITEMS, READING_AGE, ENVIRONMENTS)

_tracer = trace.get_tracer("sidecar.scaler")
_meter = metrics.get_meter("sidecar.scaler")
_watched: weakref.WeakSet[Readings] = weakref.WeakSet()

_rpc_duration = _meter.create_histogram(
    RPC_DURATION.name,
    unit=RPC_DURATION.unit,
    description=RPC_DURATION.description,
    explicit_bucket_boundaries_advisory=list(LATENCY_BUCKETS),
)
_rpc_errors = _meter.create_counter(RPC_ERRORS.name, unit=RPC_ERRORS.unit, description=RPC_ERRORS.description)
_read_errors = _meter.create_counter(READ_ERRORS.name, unit=READ_ERRORS.unit, description=READ_ERRORS.description)


def _items(_: CallbackOptions) -> Iterable[Observation]:
    for readings in list(_watched):
        for reader in readings.readers():
            reading = reader.reading
            if reading is None:
                continue
            environment = reader.environment_id
            yield Observation(reading.stats.depth, {"environment_id": environment, "state": "queued"})
            yield Observation(reading.stats.pending, {"environment_id": environment, "state": "pending"})
            if reading.in_progress is not None:
                yield Observation(reading.in_progress, {"environment_id": environment, "state": "in_progress"})


def _age(_: CallbackOptions) -> Iterable[Observation]:
    now = time.monotonic()
    for readings in list(_watched):
        for reader in readings.readers():
            if reader.reading is not None:
                yield Observation(round(now - reader.reading.at, 3), {"environment_id": reader.environment_id})


def _environments(_: CallbackOptions) -> Iterable[Observation]:
    yield Observation(sum(len(readings) for readings in list(_watched)))


for _instrument, _callback in ((READING_ITEMS, _items), (READING_AGE, _age), (ENVIRONMENTS, _environments)):
    _meter.create_observable_gauge(
        _instrument.name, [_callback], unit=_instrument.unit, description=_instrument.description
    )


def watch(readings: Readings) -> None:
    """Report `readings` in the gauges for as long as it exists."""
    _watched.add(readings)


def read_failed(error: BaseException) -> None:
    _read_errors.add(1, {"error": type(error).__name__})


@contextmanager
def read_span(environment_id: str) -> Iterator[Span]:
    """One INTERNAL span per read; the Work API client's request spans are its children."""
    with _tracer.start_as_current_span(
        "scaler.read", kind=SpanKind.INTERNAL, attributes={"work.environment_id": environment_id}
    ) as span:
        yield span


def record_call(rpc: str, code: grpc.StatusCode, seconds: float) -> None:
    attributes = {"rpc": rpc, "code": code.name}
    _rpc_duration.record(seconds, attributes)
    if code != grpc.StatusCode.OK:
        _rpc_errors.add(1, attributes)


def status_of(context: Any) -> grpc.StatusCode:
    """The code a failed call ends with (what the servicer aborted with; UNKNOWN for anything else)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


Method = TypeVar("Method", bound=Callable[..., Awaitable[Any]])


def observed(rpc: str) -> Callable[[Method], Method]:
    """Decorates a unary RPC of the servicer: its latency and outcome go to the RPC instruments."""

    def decorate(method: Method) -> Method:
        async def call(self: Any, request: Any, context: Any) -> Any:
            started = time.monotonic()
            try:
                answer = await method(self, request, context)
            except BaseException:
                record_call(rpc, status_of(context), time.monotonic() - started)
                raise
            record_call(rpc, grpc.StatusCode.OK, time.monotonic() - started)
            return answer

        call.__name__ = method.__name__
        call.__doc__ = method.__doc__
        return call  # type: ignore[return-value]

    return decorate


def markdown_table() -> str:
    """docs/scaler.md's table of the scaler's metrics (a test keeps the page equal to this)."""
    suffix = {"s": "_seconds"}
    rows = ["| metric (Prometheus name) | type | unit | labels | what |", "|---|---|---|---|---|"]
    for instrument in INSTRUMENTS:
        prometheus = instrument.name.replace(".", "_") + suffix.get(instrument.unit, "")
        if instrument.kind == "counter":
            prometheus += "_total"
        labels = ", ".join(f"`{a}`" for a in instrument.attributes) or "—"
        rows.append(
            f"| `{instrument.name}` (`{prometheus}`) | {instrument.kind} | `{instrument.unit}` | {labels} | "
            f"{instrument.description} |"
        )
    return "\n".join(rows)
