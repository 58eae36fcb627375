"""Traces and metrics of the sidecar core, through the OpenTelemetry API only.

One INTERNAL span per work item (`work`), from the poll that returned it to its end (stopped, lease
lost, released or drained); the Work API client's request spans are its children, heartbeats are
span events, and `WorkAssigned.traceparent` carries its context to the sandbox. With no SDK set up the
API is a no-op. Never recorded: secrets, keys, lease tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from .._instruments import Gauge, counter, histogram
from ..work.v1 import work_service_pb2 as pb
from ..workapi import HeartbeatResult, Work

if TYPE_CHECKING:
    from .engine._lease import Lease

log = logging.getLogger("sidecar.leases")

_tracer = trace.get_tracer("sidecar.core")
SCOPE = "sidecar.core"
_REASONS = "why the lease ended: " + ", ".join(
    name.removeprefix("LEASE_LOST_REASON_").lower() for name, _ in pb.LeaseLostReason.items()
)

polls = counter(
    SCOPE,
    "work_sidecar.polls",
    "{poll}",
    "Long polls of the Work API, by result",
    {"result": "empty (the poll timed out without an item), item, or error"},
)
acks = counter(
    SCOPE,
    "work_sidecar.acks",
    "{ack}",
    "Acks of polled items, by result",
    {"result": "ok, conflict, not_found, bad_response or error"},
)
heartbeats = counter(
    SCOPE,
    "work_sidecar.heartbeats",
    "{heartbeat}",
    "Lease heartbeats (claims and renewals), by result",
    {
        "result": "ok, precondition_failed, not_found, stopped, not_extended, expired, claim_failed, claim_error, "
        "timeout, transport or http_NNN (a failure that may pass, with its HTTP status)"
    },
)
lease_losses = counter(
    SCOPE,
    "work_sidecar.lease.losses",
    "{lease}",
    "Leases lost (the item is not this sidecar's any more; its sandbox is told LeaseLost), by reason (each "
    "reason from 0 at start)",
    {"reason": _REASONS},
)
items_completed = counter(
    SCOPE,
    "work_sidecar.items.completed",
    "{item}",
    "Items whose lease ended, by final state and reason (each from 0 at start)",
    {"final_state": "stopped or lost", "reason": _REASONS + " (unspecified for a stop)"},
)
dispatch_latency = histogram(
    SCOPE,
    "work_sidecar.dispatch.duration",
    "From the Work API returning an item to its WorkAssigned being queued for the sandbox",
)
item_duration = histogram(
    SCOPE,
    "work_sidecar.item.duration",
    "From an item's assignment to the end of its lease",
    {"final_state": "stopped or lost"},
)
leases_active = Gauge(SCOPE, "work_sidecar.leases.active", "{lease}", "Leases held: the items in flight")
watchers = Gauge(SCOPE, "work_sidecar.watchers", "{watcher}", "Open WatchWork streams")
capacity_free = Gauge(SCOPE, "work_sidecar.capacity.free", "{slot}", "Items the watchers could take now")
ready = Gauge(
    SCOPE,
    "work_sidecar.ready",
    "1",
    "Readiness: 1 while the sidecar serves and the Work API answers, 0 while it drains or every poll has failed "
    "for --unready-after seconds",
)
journal_writable = Gauge(
    SCOPE,
    "work_sidecar.journal.writable",
    "1",
    "With --state-dir: 1 while the lease journal takes writes, 0 while writing it fails (leases are not durable)",
)
journal_records = Gauge(
    SCOPE,
    "work_sidecar.journal.records",
    "{record}",
    "With --state-dir: records appended to the lease journal",
    kind="observable counter",
)

REASON_NAMES: dict[int, str] = {
    value: name.removeprefix("LEASE_LOST_REASON_").lower() for name, value in pb.LeaseLostReason.items()
}


def register_gauges(
    active_leases: Callable[[], int],
    open_watchers: Callable[[], int],
    free_capacity: Callable[[], int],
    is_ready: Callable[[], bool],
) -> None:
    """The gauges' callbacks, and the lease-end counters at 0 for every final state and reason: a series that
    appears at 1 has no increase() in Prometheus, so an alert on it would miss a pod's first loss."""
    items_completed.add(0, {"final_state": "stopped", "reason": "unspecified"})
    for reason in REASON_NAMES.values():
        if reason != "unspecified":
            lease_losses.add(0, {"reason": reason})
            items_completed.add(0, {"final_state": "lost", "reason": reason})
    leases_active.observe(active_leases)
    watchers.observe(open_watchers)
    capacity_free.observe(free_capacity)
    ready.observe(lambda: int(is_ready()))


def register_journal(is_writable: Callable[[], bool], records: Callable[[], int]) -> None:
    journal_writable.observe(lambda: int(is_writable()))
    journal_records.observe(records)


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
    if span is None or not span.get_span_context().is_valid:  # tracing off: nothing to propagate
        return "", ""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", ""), carrier.get("tracestate", "")


def end_unassigned_span(span: Span, outcome: str, reason: str) -> None:
    span.set_attribute("work.final_state", outcome)
    span.set_attribute("work.end_reason", reason)
    span.end()


def outcome(lease: Lease) -> str:
    return "stopped" if lease.state == pb.LEASE_STATE_STOPPED else "lost"


def state_name(state: int) -> str:
    return pb.LeaseState.Name(state).removeprefix("LEASE_STATE_").lower()  # type: ignore[arg-type]


def reason_name(reason: int) -> str:
    return REASON_NAMES.get(reason, "unspecified")


def _log_soon(level: int, message: str, fields: dict[str, object]) -> None:
    """Log after the current step of the event loop (with the current trace context): a transition's caller
    finishes first, so the hand-over has queued WorkAssigned before the line is formatted and written: no log
    write is on the way from the Work API's answer to the sandbox. Without a running loop (a test), at once."""
    if not log.isEnabledFor(level):
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        _write_log(level, message, fields)
        return
    loop.call_soon(_write_log, level, message, fields)


def _write_log(level: int, message: str, fields: dict[str, object]) -> None:
    log.log(level, message, extra=fields)


class TelemetryObserver:
    """Turns lease transitions into metrics, span events and log lines (the only place that does). Log lines are
    written after the transition's step (`_log_soon`)."""

    def claimed(self, lease: Lease) -> None:
        if lease.adopted:  # after a restart: the adoption logs one line for all of them
            log.debug("lease adopted", extra={"work_id": lease.work_id, "ttl_seconds": lease.ttl_seconds})
            return
        # DEBUG: "work assigned" follows at once (one INFO line per item: logging is on the hot path).
        log.debug("lease started", extra={"work_id": lease.work_id, "ttl_seconds": lease.ttl_seconds})

    def assigned(self, lease: Lease) -> None:
        if lease.span is not None and lease.sandbox_id:
            lease.span.set_attribute("sandbox.id", lease.sandbox_id)
        _log_soon(logging.INFO, "work assigned", {"work_id": lease.work_id, "sandbox_id": lease.sandbox_id})

    def renewed(self, lease: Lease, result: HeartbeatResult) -> None:
        if lease.span is not None:
            lease.span.add_event("heartbeat", {"work.state": result.state, "lease.ttl_seconds": result.ttl_seconds})

    def stop_requested(self, lease: Lease) -> None:
        _log_soon(logging.INFO, "stop requested", {"work_id": lease.work_id, "by_sandbox": lease.stop_notified})

    def ended(self, lease: Lease) -> None:
        final = outcome(lease)
        reason = reason_name(lease.lost_reason)
        if lease.state == pb.LEASE_STATE_LOST:
            lease_losses.add(1, {"reason": reason})
        items_completed.add(1, {"final_state": final, "reason": reason})
        item_duration.record(time.monotonic() - lease.claimed_at, {"final_state": final})
        span = lease.span
        if span is not None:
            span.set_attribute("work.final_state", final)
            if lease.lost_reason != pb.LEASE_LOST_REASON_UNSPECIFIED:
                span.set_attribute("work.end_reason", reason)
            if lease.sandbox_id:
                span.set_attribute("sandbox.id", lease.sandbox_id)
            if final == "lost":
                span.set_status(Status(StatusCode.ERROR, f"lease lost: {reason}"))
            span.end()
        fields: dict[str, object] = {"work_id": lease.work_id, "state": final}
        if lease.lost_reason != pb.LEASE_LOST_REASON_UNSPECIFIED:
            fields.update(reason=reason, detail=lease.lost_message)
        _log_soon(logging.INFO if final == "stopped" else logging.WARNING, "lease ended", fields)
