"""The lease state machine (`sidecar.core.engine._lease.Leases`) on its own: transitions and their invariants.

Guarantees checked here: a lease is in the table exactly while it is held; an ended lease never renews, never
changes state again and never re-enters the table; a new claim of the same item ends the stale lease and issues
a new token; only `_lease.py` assigns a lease's fields.
"""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest

from sidecar.core.engine._lease import Lease, Leases
from sidecar.core.engine._policy import Backoff, LeasePolicy, PollPolicy
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import HeartbeatResult, Work, WorkData

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"


def _work(work_id: str = "work_1") -> Work:
    return Work(id=work_id, environment_id="env_x", data=WorkData(type="session", id="s"), state="active", metadata={})


def _beat(last: str = "2026-01-01T00:00:00.000001Z", *, ttl: int = 60, state: str = "active") -> HeartbeatResult:
    return HeartbeatResult(last_heartbeat=last, lease_extended=True, state=state, ttl_seconds=ttl)


class Recorder:
    """A LeaseObserver that writes down what it heard."""

    def __init__(self) -> None:
        self.heard: list[tuple[str, str]] = []

    def claimed(self, lease: Lease) -> None:
        self.heard.append(("claimed", lease.work_id))

    def assigned(self, lease: Lease) -> None:
        self.heard.append(("assigned", lease.work_id))

    def renewed(self, lease: Lease, result: HeartbeatResult) -> None:
        self.heard.append(("renewed", result.last_heartbeat))

    def stop_requested(self, lease: Lease) -> None:
        self.heard.append(("stop_requested", lease.work_id))

    def ended(self, lease: Lease) -> None:
        self.heard.append(("ended", lease.work_id))


@dataclasses.dataclass(eq=False)
class FakeWatcher:
    """Stands in for a dispatcher Watcher: `assign` reads only these two fields."""

    sandbox_id: str = "sb"
    closed: bool = False


async def test_a_lease_is_in_the_table_exactly_while_it_is_held() -> None:
    recorder = Recorder()
    leases = Leases([recorder])
    lease = leases.claim(_work(), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    assert leases.get("work_1") is lease and len(leases) == 1
    leases.assign(lease, FakeWatcher())  # type: ignore[arg-type]
    assert leases.renewed(lease, _beat("2026-01-01T00:00:01.000001Z"), sent_at=time.monotonic())
    assert leases.request_stop(lease)
    assert lease.state == pb.LEASE_STATE_STOP_REQUESTED
    assert leases.end(lease, pb.LEASE_STATE_STOPPED)
    assert leases.get("work_1") is None and len(leases) == 0
    assert leases.authorize("work_1", lease.token) is lease, "a tombstone tells a late sandbox how it ended"
    assert [kind for kind, _ in recorder.heard] == ["claimed", "assigned", "renewed", "stop_requested", "ended"]
    await asyncio.wait_for(leases.wait_all_ended(), 1)


async def test_an_ended_lease_never_renews_or_changes_again() -> None:
    leases = Leases()
    lease = leases.claim(_work(), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    assert leases.lose(lease, pb.LEASE_LOST_REASON_EXPIRED, "expired")
    before = (lease.last_heartbeat, lease.state, lease.lost_reason, lease.expires_at)
    assert not leases.renewed(lease, _beat("2026-01-01T00:09:00.000001Z"), sent_at=time.monotonic())
    assert not leases.request_stop(lease)
    assert not leases.end(lease, pb.LEASE_STATE_STOPPED)
    assert (lease.last_heartbeat, lease.state, lease.lost_reason, lease.expires_at) == before
    with pytest.raises(ValueError, match="ended"):
        leases.assign(lease, FakeWatcher())  # type: ignore[arg-type]
    assert leases.get("work_1") is None, "an ended lease never re-enters the table"


async def test_a_new_claim_of_the_same_item_ends_the_stale_lease() -> None:
    """The Work API handed the item out again (our lease expired there): the old lease is lost, its token no
    longer authorizes anything, and the new lease is held under a new token."""
    leases = Leases()
    stale = leases.claim(_work(), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    fresh = leases.claim(_work(), _beat("2026-01-01T00:05:00.000001Z"), sent_at=time.monotonic(), ttl_seconds=60)
    assert stale.ended and stale.lost_reason == pb.LEASE_LOST_REASON_EXPIRED
    assert fresh.token != stale.token and leases.get("work_1") is fresh and len(leases) == 1
    assert leases.authorize("work_1", stale.token) is None
    assert leases.authorize("work_1", fresh.token) is fresh


async def test_end_tells_subscribers_and_forgets_them() -> None:
    leases = Leases()
    lease = leases.claim(_work(), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    queue: asyncio.Queue[Any] = asyncio.Queue()
    leases.subscribe(lease, queue)
    leases.end(lease, pb.LEASE_STATE_LOST, pb.LEASE_LOST_REASON_NOT_FOUND, "gone")
    update = queue.get_nowait()
    assert update.lease.state == pb.LEASE_STATE_LOST and update.lease.lost_reason == pb.LEASE_LOST_REASON_NOT_FOUND
    leases.subscribe(lease, queue)  # an ended lease has no followers to tell
    assert queue.empty()


async def test_a_claim_without_a_ttl_in_the_answer_uses_the_one_asked_for() -> None:
    leases = Leases()
    lease = leases.claim(_work(), _beat(ttl=0), sent_at=time.monotonic(), ttl_seconds=42)
    assert lease.ttl_seconds == 42


def test_only_the_lease_module_assigns_lease_fields() -> None:
    """No other module writes `<lease>.<field> = …`: the state machine has one owner."""
    fields = {f.name for f in dataclasses.fields(Lease)}
    offenders = []
    for path in SIDECAR.rglob("*.py"):
        if path.name == "_lease.py" or "work" in path.relative_to(SIDECAR).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            for target in targets:
                if (
                    isinstance(target, ast.Attribute)
                    and target.attr in fields
                    and isinstance(target.value, ast.Name)
                    and "lease" in target.value.id.lower()
                ):
                    offenders.append(f"{path.relative_to(SIDECAR)}:{target.lineno}")
    assert not offenders, f"lease fields assigned outside _lease.py: {offenders}"


def test_policies_declare_the_documented_rules() -> None:
    policy = LeasePolicy()
    assert policy.heartbeat_interval(600) == 30.0, "the official cadence's cap"
    assert [policy.heartbeat_interval(t) for t in (2, 4, 10, 60)] == [0.5, 1.25, 4.25, 27.0], "half the fenced window"
    assert [policy.fence_margin(t) for t in (1, 2, 10, 60)] == [0.5, 1.0, 1.5, 6.0]
    for ttl in (1, 2, 3, 4, 10, 60, 600):  # a failed renewal always has time for a retry before the fence
        assert 0 < policy.heartbeat_interval(ttl) <= 0.5 * (ttl - policy.fence_margin(ttl))
    assert all(0.2 * 2.0 <= policy.retry_delay(60) <= 2.0 for _ in range(100))
    # half the window per attempt, so a lost answer leaves time to ask again; a window too short for two attempts of
    # a second goes whole to one (at TTL 4, a 1 s round trip fits the 1.25 s window, not a 1 s attempt)
    assert [policy.attempt_timeout(b) for b in (0.5, 1.25, 1.99, 2.0, 27.0)] == [0.5, 1.25, 1.99, 1.0, 13.5]
    backoff = Backoff(initial=0.5, maximum=10.0)
    assert [backoff.ceiling(n) for n in (1, 2, 3, 5, 10)] == [0.5, 1.0, 2.0, 8.0, 10.0]
    assert all(5.0 <= backoff.delay(10) <= 10.0 for _ in range(100)), "grows to the cap and stays there"
    assert PollPolicy().final_backoff.maximum >= 60, "a revoked key is logged about once a minute, not every second"
    with pytest.raises(ValueError, match="block"):
        PollPolicy(block_ms=1000)
    with pytest.raises(ValueError, match="ttl"):
        LeasePolicy(ttl_seconds=0)


async def test_an_adopted_lease_keeps_its_token_and_a_buried_one_tells_how_it_ended() -> None:
    from datetime import UTC, datetime, timedelta

    from sidecar.core.persistence._tokens import TokenIssuer

    tokens = TokenIssuer.ephemeral()
    first = Leases(tokens=tokens)
    held = first.claim(_work("work_1"), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    ended = first.claim(_work("work_2"), _beat(), sent_at=time.monotonic(), ttl_seconds=60)
    recorder = Recorder()
    successor = Leases([recorder], tokens=tokens)
    expires = datetime.now(UTC) + timedelta(seconds=50)
    adopted = successor.adopt(
        _work("work_1"), nonce=held.nonce, last_heartbeat=held.last_heartbeat, ttl_seconds=60, expires_at=expires,
        state=pb.LEASE_STATE_STOP_REQUESTED, stop_notified=True, sandbox_id="sb",
    )  # fmt: skip
    assert successor.authorize("work_1", held.token) is adopted and adopted.adopted
    assert adopted.state == pb.LEASE_STATE_STOP_REQUESTED and adopted.watcher is None
    assert 9 < adopted.expires - time.monotonic() <= 50, "self-fencing counts from the journaled heartbeat"
    assert recorder.heard == [("claimed", "work_1")]
    with pytest.raises(ValueError, match="already held"):
        successor.adopt(_work("work_1"), nonce="n", last_heartbeat="x", ttl_seconds=60, expires_at=expires)
    buried = successor.bury(
        _work("work_2"), nonce=ended.nonce, state=pb.LEASE_STATE_LOST, reason=pb.LEASE_LOST_REASON_SANDBOX_GONE
    )
    assert successor.authorize("work_2", ended.token) is buried and buried.ended
    assert successor.get("work_2") is None and len(successor) == 1
    assert successor.authorize("work_1", ended.token) is None, "a token is bound to its work id"
