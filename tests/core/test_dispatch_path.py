"""Issue #13, the dispatch path: the ack before any further poll, pollers that follow free capacity, and
`PollPolicy.idle_poll_gap`. Observed from the outside: the emulator's request log and the sandbox's stream."""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import datetime
from typing import Any

from tests.helpers import eventually

from ._probes import peak_overlap, polls_in_flight
from .conftest import Api, SidecarFactory


def _at(entry: dict[str, Any]) -> float:
    return datetime.fromisoformat(entry["at"].replace("Z", "+00:00")).timestamp()


def _end(entry: dict[str, Any]) -> float:
    return _at(entry) + (entry["duration_ms"] or 0) / 1000


async def test_13_the_ack_goes_out_before_any_further_poll(api: Api, start_sidecar: SidecarFactory) -> None:
    """#13 "dispatch at the floor": with free slots left (so the poller would poll again at once), no poll arrives
    between the poll that returned an item and that item's ack; the claim follows the ack."""
    running = await start_sidecar()
    watch = running.watch(max_in_flight=5)
    await eventually(lambda: _positive(polls_in_flight(api)), message="the idle long poll")
    await api.fault(operation="ack", count=None, latency_ms=100)  # room for a poll to slip in before the ack ends
    for _ in range(4):
        await api.enqueue(1)
        await watch.assigned()
    log = await api.admin.requests()
    polls = [e for e in log if e["operation"] == "poll" and e["status"] == 200]
    acks = [e for e in log if e["operation"] == "ack"]
    claims = [e for e in log if e["operation"] == "heartbeat"]
    assert len(acks) == 4
    for ack in acks:
        returned = max((p for p in polls if _end(p) <= _at(ack) and p["duration_ms"] < 900), key=_end)
        between = [p for p in polls if _end(returned) <= _at(p) < _at(ack)]
        assert not between, f"{len(between)} poll(s) went out between the poll that returned an item and its ack"
        claim = next(c for c in claims if c["work_id"] == ack["work_id"])
        assert _at(claim) >= _end(ack) and _at(claim) - _end(ack) < 0.5, "the claim right after the ack"
    watch.cancel()


async def test_13_pollers_follow_free_capacity_beyond_four(api: Api, start_sidecar: SidecarFactory) -> None:
    """#13 "bursts": a burst of 40 items at 40 free slots is polled by more than 4 pollers at once (the old fixed
    bound), never more than the free slots, and back to one poll once the queue is empty."""
    running = await start_sidecar()
    watch = running.watch(max_in_flight=40)
    await eventually(lambda: _positive(polls_in_flight(api)), message="the idle long poll")
    await api.fault(operation="poll", count=None, latency_ms=60)  # so parallel polls overlap in the log
    await api.enqueue(40)
    started = time.monotonic()
    items = [await watch.assigned() for _ in range(40)]
    assert len({i.work.id for i in items}) == 40
    peak = peak_overlap([e for e in await api.admin.requests("poll") if _at(e) >= time.time() - 30])
    assert 4 < peak <= 40, f"parallel polls should follow the 40 free slots (peak {peak})"
    assert time.monotonic() - started < 10
    await api.clear_faults()
    watch.cancel()


async def test_13_idle_poll_gap_spaces_empty_polls(api: Api, start_sidecar: SidecarFactory) -> None:
    """#13 "idle cost": with idle_poll_gap=0.5 and block_ms=100, empty polls are ≥ 0.5 s apart (about 100/min
    instead of 400/min), and an item that arrives still gets dispatched."""
    running = await start_sidecar(block_ms=100, idle_poll_gap=0.5)
    watch = running.watch()
    await eventually(lambda: _positive(polls_in_flight(api)), message="the first poll")
    since = time.time()
    await eventually(lambda: _count_polls_since(api, since, 4), timeout=10, message="four polls at the gap's pace")
    polls = sorted((e for e in await api.admin.requests("poll") if _at(e) >= since), key=_at)
    gaps = [_at(b) - _end(a) for a, b in itertools.pairwise(polls) if a["duration_ms"] is not None]
    assert gaps and min(gaps) >= 0.45, f"empty polls closer than the gap: {gaps}"
    await api.enqueue(1)
    assigned = await watch.assigned(timeout=5)
    assert assigned.work.id
    watch.cancel()


async def _positive(value: Any) -> bool:
    return bool(await value > 0)


async def _count_polls_since(api: Api, since: float, count: int) -> bool:
    return sum(1 for e in await api.admin.requests("poll") if _at(e) >= since) >= count


async def test_a_drain_lets_a_hand_over_under_way_finish(api: Api, start_sidecar: SidecarFactory) -> None:
    """No stranded item, no needless re-delivery: the poll loop that polled an item hands it over itself, and a
    drain that stops polling while its ack is in flight must not cancel it (an acked item nobody claims stays
    `starting`), nor end the sandbox's stream before the item reaches it (the lease would be released and the item
    delivered again). The item reaches its sandbox, which finishes it within the drain."""
    running = await start_sidecar(drain_timeout=3.0)
    watch = running.watch()
    await eventually(lambda: _positive(polls_in_flight(api)), message="the idle long poll")
    await api.fault(operation="ack", latency_ms=800)
    [queued] = await api.enqueue(1)
    await eventually(lambda: _ack_in_flight(api), message="the ack is on its way")
    drain = asyncio.ensure_future(running.sidecar.drain())
    assigned = await watch.assigned(timeout=5)
    assert assigned.work.id == queued["id"], "the hand-over went on through the drain"
    await running.stop(assigned)
    await asyncio.wait_for(drain, 10)
    view = await api.item(queued["id"])
    assert (view["state"], view["deliveries"]) == ("stopped", 1)
    watch.cancel()


async def _ack_in_flight(api: Api) -> bool:
    return any(entry["status"] is None for entry in await api.requests("ack"))
