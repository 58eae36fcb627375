"""`core/edge/_convert.py`: the hand-rolled Timestamp conversion agrees with protobuf's own `FromDatetime`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.edge._convert import fill_timestamp, fill_work
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import Work


def timestamp(value: datetime | str | None) -> Timestamp | None:
    ts = Timestamp()
    return ts if fill_timestamp(ts, value) else None


def _reference(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


@given(
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2400, 1, 1)),
    st.one_of(st.none(), st.integers(min_value=-14 * 60, max_value=14 * 60)),
)
def test_timestamp_matches_protobuf(naive: datetime, offset_minutes: int | None) -> None:
    when = naive if offset_minutes is None else naive.replace(tzinfo=timezone(timedelta(minutes=offset_minutes)))
    assert timestamp(when) == _reference(when)


def test_timestamp_of_rfc3339_strings() -> None:
    assert timestamp("1969-12-31T23:59:59.5Z") == Timestamp(seconds=-1, nanos=500_000_000)
    assert timestamp("2026-12-02T05:00:00.123456+02:00") == _reference(datetime(2026, 12, 2, 3, 0, 0, 123456, UTC))
    assert timestamp("not a time") is None
    assert timestamp(None) is None


def test_fill_work_carries_every_timestamp_it_has() -> None:
    work = Work.from_json(
        {
            "id": "work_011CSdNtQP2qLp5QBMeoZSLs",
            "type": "work",
            "environment_id": "env_x",
            "state": "active",
            "data": {"type": "session", "id": "sesn_1"},
            "created_at": "2026-12-02T05:00:00.123456Z",
            "started_at": "2026-12-02T05:00:01Z",
            "metadata": {"a": "b"},
        }
    )
    message = fill_work(pb.Work(), work)
    assert message.state == pb.WORK_STATE_ACTIVE and message.raw_state == "active"
    assert message.created_at == Timestamp(seconds=1796187600, nanos=123_456_000)
    assert message.started_at == Timestamp(seconds=1796187601)
    assert not message.HasField("stopped_at") and not message.HasField("acknowledged_at")
    assert dict(message.metadata) == {"a": "b"}
