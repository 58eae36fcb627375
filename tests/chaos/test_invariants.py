"""The invariant checker catches what it claims to (on constructed histories)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chaos.invariants import check, holds, secrets_found, uncovered


def at(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def hb(work_id: str, t: float, ttl: int, status: int = 200) -> dict[str, Any]:
    return {"operation": "heartbeat", "work_id": work_id, "status": status, "at": at(t),
            "query": {"desired_ttl_seconds": str(ttl)}}  # fmt: skip


T0 = 1_800_000_000.0
STOPPED = [{"id": "w1", "state": "stopped"}]


def run(sandboxes: list[Any], log: list[dict[str, Any]], items: list[dict[str, Any]] = STOPPED, **kw: Any) -> Any:
    return check(item_ids=["w1"], items=items, log=log, sandboxes=sandboxes, outputs=[], secrets=set(),
                 ttl_bounds=(1, 600, 60), **kw)  # fmt: skip


def test_uncovered() -> None:
    assert uncovered(0, 10, [(0, 4), (3, 8)]) == 2
    assert uncovered(0, 10, [(0, 11)]) == 0
    assert uncovered(5, 6, []) == 1


def test_a_clean_history_is_clean() -> None:
    events = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "stopped", "work_id": "w1", "t": T0 + 5}]
    verdict = run([("a", events, None)], [hb("w1", T0 - 0.01, 4), hb("w1", T0 + 2, 4)])
    assert verdict.clean and verdict.completed == 1


def test_holding_past_the_lease_is_lost() -> None:
    events = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "lost", "work_id": "w1", "t": T0 + 4.3}]
    verdict = run([("a", events, None)], [hb("w1", T0 - 0.01, 4)])
    assert verdict.lost == 1


def test_theft_grace() -> None:
    events = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "lost", "work_id": "w1", "t": T0 + 3}]
    log = [hb("w1", T0 - 0.01, 4), hb("w1", T0 + 2, 4)]
    assert run([("a", events, None)], log, stolen={"w1": T0 + 1}).lost == 0
    assert run([("a", events, None)], log, stolen={"w1": T0 + 1}, theft_grace=1.0).lost == 1


def test_two_holders_at_once_is_duplicated() -> None:
    a = [{"ev": "assigned", "work_id": "w1", "t": T0}]
    b = [{"ev": "assigned", "work_id": "w1", "t": T0 + 1}, {"ev": "stopped", "work_id": "w1", "t": T0 + 2}]
    verdict = run([("a", a, T0 + 3), ("b", b, None)], [hb("w1", T0, 10)])
    assert verdict.duplicated == 1
    assert [h.end_kind for h in holds([("a", a, T0 + 3)], T0 + 9)] == ["killed"]


def test_starting_and_unheld_stops_are_stranded() -> None:
    assert run([], [], items=[{"id": "w1", "state": "starting"}]).stranded == 1
    assert run([], [], items=STOPPED).stranded == 1  # stopped though nobody held it


def test_secrets_found_raw_and_escaped() -> None:
    assert secrets_found(['{"msg": "token sk-ant-abcdefgh"}'], {"sk-ant-abcdefgh", "other-secret"}) == {
        "sk-ant-abcdefgh"
    }
    assert secrets_found(["eyJhYmMiOiJkZWYifQ"], {"eyJhYmMiOiJkZWYifQ=="}) == {"eyJhYmMiOiJkZWYifQ=="}
