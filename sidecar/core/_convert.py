"""Conversions between the Work API client's models and the sidecar.work.v1 messages."""

from __future__ import annotations

from datetime import datetime

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


def timestamp(value: datetime | str | None) -> Timestamp | None:
    when = parse_time(value) if isinstance(value, str) or value is None else value
    if when is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


def work_message(work: Work) -> pb.Work:
    message = pb.Work(
        id=work.id,
        environment_id=work.environment_id,
        data=pb.WorkData(type=work.data.type, id=work.data.id),
        state=WORK_STATES.get(work.state, pb.WORK_STATE_UNSPECIFIED),
        metadata=work.metadata,
        raw_state=work.state,
    )
    for name in WORK_TIMESTAMPS:
        ts = timestamp(getattr(work, name))
        if ts is not None:
            getattr(message, name).CopyFrom(ts)
    return message


def queue_stats_message(stats: QueueStats, sidecar: pb.SidecarStats) -> pb.GetQueueStatsResponse:
    message = pb.GetQueueStatsResponse(
        depth=stats.depth, pending=stats.pending, workers_polling=stats.workers_polling, sidecar=sidecar
    )
    ts = timestamp(stats.oldest_queued_at)
    if ts is not None:
        message.oldest_queued_at.CopyFrom(ts)
    return message
