"""The invariant checker catches what it claims to (on constructed histories)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from chaos.invariants import Witness, check, holds, secrets_found, uncovered


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


def test_a_run_after_a_lost_lease_the_api_still_granted_is_reworked() -> None:
    """The defect a lost answer causes: the sandbox hears LeaseLost while the sidecar's last intact renewal still
    covers it (a 412 to its own applied renewal was believed), and the item is worked on again after it lapses."""
    a = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "lost", "work_id": "w1", "t": T0 + 2.2}]
    b = [{"ev": "assigned", "work_id": "w1", "t": T0 + 6}, {"ev": "stopping", "work_id": "w1", "t": T0 + 7}]
    log = [hb("w1", T0 - 0.01, 4), hb("w1", T0 + 2, 4), hb("w1", T0 + 5.9, 4)]
    intact = {"w1": [T0 - 0.01, T0 + 1.2]}  # the renewal at T0 + 2 was applied, its answer lost
    verdict = run([("a", a, None), ("b", b, None)], log, seen=Witness(intact), ttl=4)
    assert verdict.reworked == 1 and verdict.duplicated == 0 and verdict.lost == 0
    assert not verdict.clean and "reworked w1" in verdict.notes[0]


def test_a_redelivery_the_fence_clock_or_a_kill_or_a_theft_explains_is_not_reworked() -> None:
    a = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "lost", "work_id": "w1", "t": T0 + 2.6}]
    b = [{"ev": "assigned", "work_id": "w1", "t": T0 + 6}, {"ev": "stopping", "work_id": "w1", "t": T0 + 7}]
    log = [hb("w1", T0 - 0.01, 4), hb("w1", T0 + 5.9, 4)]
    # no intact renewal since T0: at TTL 4 the sidecar fences 2.5 s after it (fence margin 1.5 s)
    seen = Witness({"w1": [T0 - 0.01]})
    assert run([("a", a, None), ("b", b, None)], log, seen=seen, ttl=4).reworked == 0
    early = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "lost", "work_id": "w1", "t": T0 + 1.0}]
    assert run([("a", early, None), ("b", b, None)], log, seen=seen, ttl=4).reworked == 1
    assert run([("a", early, T0 + 3), ("b", b, None)], log, seen=seen, ttl=4).reworked == 0  # killed
    assert run([("a", early, None), ("b", b, None)], log, seen=seen, stolen={"w1": T0 + 0.5}).reworked == 0
    refused = Witness({"w1": [T0 - 0.01]}, {"w1": [T0 + 0.9]})  # a 412 the proxy made up
    assert run([("a", early, None), ("b", b, None)], log, seen=refused, ttl=4).reworked == 0


def test_a_finished_run_given_again_is_reworked() -> None:
    """Its stop never landed: the work ran to its end once, then again."""
    a = [{"ev": "assigned", "work_id": "w1", "t": T0}, {"ev": "stopping", "work_id": "w1", "t": T0 + 1},
         {"ev": "stop_error", "work_id": "w1", "t": T0 + 2}]  # fmt: skip
    b = [{"ev": "assigned", "work_id": "w1", "t": T0 + 6}, {"ev": "stopping", "work_id": "w1", "t": T0 + 7}]
    verdict = run([("a", a, None), ("b", b, None)], [hb("w1", T0 - 0.01, 4), hb("w1", T0 + 5.9, 4)])
    assert verdict.reworked == 1
