"""Traces and metrics of the sidecar core, through the OpenTelemetry API only.

One INTERNAL span per work item (`work`), from the poll that returned it to its end (stopped, lease
lost, released or drained); the Work API client's request spans are its children, heartbeats are
span events, and `WorkAssigned.traceparent` carries its context to the sandbox. With no SDK set up the
API is a no-op. Never recorded: secrets, keys, lease tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from ..work.v1 import work_service_pb2 as pb
from ..workapi import Work

if TYPE_CHECKING:
    from ._lease import Lease

_tracer = trace.get_tracer("sidecar.core")
_meter = metrics.get_meter("sidecar.core")

polls = _meter.create_counter("work_sidecar.polls", unit="{poll}", description="Long polls by result (empty, item)")
acks = _meter.create_counter("work_sidecar.acks", unit="{ack}", description="Acks by result")
heartbeats = _meter.create_counter(
    "work_sidecar.heartbeats", unit="{heartbeat}", description="Heartbeats by result (ok, or the failure reason)"
)
lease_losses = _meter.create_counter("work_sidecar.lease.losses", unit="{lease}", description="Leases lost, by reason")
items_completed = _meter.create_counter(
    "work_sidecar.items.completed", unit="{item}", description="Items whose lease ended, by final state and reason"
)
dispatch_latency = _meter.create_histogram(
    "work_sidecar.dispatch.duration",
    unit="s",
    description="From the Work API returning an item to WorkAssigned being queued for the sandbox",
)
item_duration = _meter.create_histogram(
    "work_sidecar.item.duration", unit="s", description="From assignment to the end of the lease"
)

REASON_NAMES: dict[int, str] = {
    value: name.removeprefix("LEASE_LOST_REASON_").lower() for name, value in pb.LeaseLostReason.items()
}


def register_gauges(
    active_leases: Callable[[], int], watchers: Callable[[], int], free_capacity: Callable[[], int]
) -> None:
    def gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(read())

        return callback

    _meter.create_observable_gauge(
        "work_sidecar.leases.active", [gauge(active_leases)], unit="{lease}", description="Leases held"
    )
    _meter.create_observable_gauge(
        "work_sidecar.watchers", [gauge(watchers)], unit="{watcher}", description="Open WatchWork streams"
    )
    _meter.create_observable_gauge(
        "work_sidecar.capacity.free",
        [gauge(free_capacity)],
        unit="{slot}",
        description="Items the watchers could take now",
    )


def start_work_span(work: Work, provider: str) -> Span:
    attributes: dict[str, str] = {
        "work.id": work.id,
        "work.environment_id": work.environment_id,
        "work.data_type": work.data.type,
        "work_api.provider": provider,
    }
    if work.session_id:
        attributes["work.session_id"] = work.session_id
    return _tracer.start_span("work", kind=SpanKind.INTERNAL, attributes=attributes, context=otel_context.Context())


def use(span: Span | None) -> AbstractContextManager[Any]:
    """A context manager that makes `span` current (for the client spans of this item)."""
    if span is None:
        return trace.use_span(trace.INVALID_SPAN, end_on_exit=False)
    return trace.use_span(span, end_on_exit=False)


def trace_headers(span: Span | None) -> tuple[str, str]:
    """(traceparent, tracestate) for the item's span; empty strings when tracing is off."""
    if span is None:
        return "", ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def end_work_span(lease: Lease, outcome: str) -> None:
    span = lease.span
    if span is None:
        return
    reason = REASON_NAMES.get(lease.lost_reason, "")
    span.set_attribute("work.final_state", outcome)
    if reason and reason != "unspecified":
        span.set_attribute("work.end_reason", reason)
    if lease.sandbox_id:
        span.set_attribute("sandbox.id", lease.sandbox_id)
    if outcome == "lost":
        span.set_status(Status(StatusCode.ERROR, f"lease lost: {reason}"))
    span.end()
    lease.span = None


def end_unassigned_span(span: Span, outcome: str, reason: str) -> None:
    span.set_attribute("work.final_state", outcome)
    span.set_attribute("work.end_reason", reason)
    span.end()
