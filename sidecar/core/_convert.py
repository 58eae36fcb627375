"""Conversions between the Work API client's models and the sidecar.work.v1 messages."""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ..wire import WORK_TIMESTAMPS
from ..work.v1 import work_service_pb2 as pb
from ..workapi import QueueStats, Work, parse_time

WORK_STATES = {
    "queued": pb.WORK_STATE_QUEUED,
    "starting": pb.WORK_STATE_STARTING,
    "active": pb.WORK_STATE_ACTIVE,
    "stopping": pb.WORK_STATE_STOPPING,
    "stopped": pb.WORK_STATE_STOPPED,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def timestamp(value: datetime | str | None) -> Timestamp | None:
    """A protobuf Timestamp (whole microseconds) of an aware datetime or an RFC 3339 string; naive means UTC.
    Integer arithmetic on the timedelta: `Timestamp.FromDatetime` goes through a time tuple, several times slower
    on the path of every assignment."""
    when = parse_time(value) if isinstance(value, str) or value is None else value
    if when is None:
        return None
    delta = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    return Timestamp(seconds=delta.days * 86_400 + delta.seconds, nanos=delta.microseconds * 1000)


def work_message(work: Work) -> pb.Work:
    times = {}
    for name in WORK_TIMESTAMPS:
        value = getattr(work, name)
        if value is not None:
            ts = timestamp(value)
            if ts is not None:
                times[name] = ts
    return pb.Work(
        id=work.id,
        environment_id=work.environment_id,
        data=pb.WorkData(type=work.data.type, id=work.data.id),
        state=WORK_STATES.get(work.state, pb.WORK_STATE_UNSPECIFIED),
        metadata=work.metadata,
        raw_state=work.state,
        **times,
    )


def queue_stats_message(stats: QueueStats, sidecar: pb.SidecarStats) -> pb.GetQueueStatsResponse:
    message = pb.GetQueueStatsResponse(
        depth=stats.depth, pending=stats.pending, workers_polling=stats.workers_polling, sidecar=sidecar
    )
    ts = timestamp(stats.oldest_queued_at)
    if ts is not None:
        message.oldest_queued_at.CopyFrom(ts)
    return message
