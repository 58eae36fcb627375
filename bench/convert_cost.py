"""`python -m bench.convert_cost`: the CPU of building one WorkAssigned event, nested constructors vs in place.

Why `sidecar/core/edge/_convert.py` fills messages in place: with upb, a message handed to a constructor as a keyword is
copied, so building `WatchWorkResponse(work_assigned=WorkAssigned(work=Work(created_at=Timestamp(…))))` copies
each level again. The sidecar builds one such event per assignment and a `Work` per stop (issue #13).
"""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp

from sidecar.core.edge._convert import WORK_STATES, fill_timestamp, fill_work
from sidecar.wire import WORK_TIMESTAMPS
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import Work

WORK = Work.from_json(
    {
        "id": "work_011CgJc2Z7X3gHq5Cjg1kNno",
        "environment_id": "env_011CgJc2Z7X3gHq5Cjg1kNnp",
        "data": {"type": "session", "id": "sesn_011CgJc2Z7X3gHq5Cjg1kNnq"},
        "state": "active",
        "metadata": {},
        "created_at": "2026-12-02T07:09:01.123456Z",
        "acknowledged_at": "2026-12-02T07:09:01.125456Z",
        "started_at": "2026-12-02T07:09:01.127456Z",
        "latest_heartbeat_at": "2026-12-02T07:09:01.127456Z",
    }
)


def _nested() -> pb.WatchWorkResponse:
    times = {}
    for name in WORK_TIMESTAMPS:
        value = getattr(WORK, name)
        if value is not None:
            ts = Timestamp()
            if fill_timestamp(ts, value):  # the same arithmetic as in place: only the construction differs
                times[name] = ts
    work = pb.Work(
        id=WORK.id,
        environment_id=WORK.environment_id,
        data=pb.WorkData(type=WORK.data.type, id=WORK.data.id),
        state=WORK_STATES.get(WORK.state, pb.WORK_STATE_UNSPECIFIED),
        metadata=WORK.metadata,
        raw_state=WORK.state,
        **times,
    )
    lease = pb.Lease(work_id=WORK.id, state=pb.LEASE_STATE_ACTIVE, last_heartbeat="x", ttl_seconds=60)
    return pb.WatchWorkResponse(work_assigned=pb.WorkAssigned(work=work, lease_token="token", lease=lease))


def _in_place() -> pb.WatchWorkResponse:
    response = pb.WatchWorkResponse()
    message = response.work_assigned
    fill_work(message.work, WORK)
    message.lease_token = "token"
    lease = message.lease
    lease.work_id = WORK.id
    lease.state = pb.LEASE_STATE_ACTIVE
    lease.last_heartbeat = "x"
    lease.ttl_seconds = 60
    return response


def main(calls: int = 50_000) -> None:
    assert _nested() == _in_place()
    figures = {}
    for name, build in (("nested constructors", _nested), ("in place", _in_place)):
        started = time.process_time()
        for _ in range(calls):
            build()
        figures[name] = (time.process_time() - started) / calls * 1e6
    print(", ".join(f"{name} {value:.1f} µs" for name, value in figures.items()), "per WorkAssigned event (hot)")


if __name__ == "__main__":
    main()
