"""Conversions between the Work API client's models and the sidecar.work.v1 messages.

Messages are filled in place (`fill_work`, `fill_timestamp`): with upb, a message passed to a constructor as a
keyword is copied, so `WatchWorkResponse(work_assigned=WorkAssigned(work=Work(created_at=Timestamp(…))))` copies
each level again. Filling the fields of the outermost message copies nothing, on the path of every assignment and
every stop (`python -m bench.convert_cost` compares the two).
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp

from ...wire import WORK_TIMESTAMPS
from ...work.v1 import work_service_pb2 as pb
from ...workapi import QueueStats, Work, parse_time

WORK_STATES = {
    "queued": pb.WORK_STATE_QUEUED,
    "starting": pb.WORK_STATE_STARTING,
    "active": pb.WORK_STATE_ACTIVE,
    "stopping": pb.WORK_STATE_STOPPING,
    "stopped": pb.WORK_STATE_STOPPED,
}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def fill_timestamp(target: Timestamp, value: datetime | str | None) -> bool:
    """Set `target` to an aware datetime or an RFC 3339 string (whole microseconds; naive means UTC). False, and
    `target` untouched, when there is no time. Integer arithmetic on the timedelta: `Timestamp.FromDatetime` goes
    through a time tuple, on the path of every assignment."""
    when = parse_time(value) if isinstance(value, str) or value is None else value
    if when is None:
        return False
    delta = (when if when.tzinfo is not None else when.replace(tzinfo=UTC)) - _EPOCH
    target.seconds = delta.days * 86_400 + delta.seconds
    target.nanos = delta.microseconds * 1000
    return True


def fill_work(target: pb.Work, work: Work) -> pb.Work:
    """Fill an empty `pb.Work` (a field of the message being built) from `work`."""
    target.id = work.id
    target.environment_id = work.environment_id
    data = target.data
    data.type = work.data.type
    data.id = work.data.id
    target.state = WORK_STATES.get(work.state, pb.WORK_STATE_UNSPECIFIED)
    target.raw_state = work.state
    if work.metadata:
        target.metadata.update(work.metadata)
    for name in WORK_TIMESTAMPS:
        value = getattr(work, name)
        if value is not None:
            fill_timestamp(getattr(target, name), value)  # reading a field does not make it present; setting does
    return target


def queue_stats_message(stats: QueueStats, sidecar: pb.SidecarStats) -> pb.GetQueueStatsResponse:
    message = pb.GetQueueStatsResponse(
        depth=stats.depth, pending=stats.pending, workers_polling=stats.workers_polling, sidecar=sidecar
    )
    fill_timestamp(message.oldest_queued_at, stats.oldest_queued_at)
    return message
