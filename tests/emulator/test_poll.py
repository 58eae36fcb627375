"""Long polls: wake at once on a new item, `null` after block_ms, validation, reclaim, one item per waiter."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sidecar.emulator import Emulator, EmulatorSettings
from sidecar.emulator._store import MemoryStore
from tests.helpers import eventually

from .conftest import ANTHROPIC, ENV, KEY, QODER, Api, Flavour


async def _waiting_polls(api: Api, count: int) -> None:
    """Wait until `count` polls are parked in the emulator (observed through the admin API)."""

    async def parked() -> bool:
        view = (await api.http.get(f"/_emulator/environments/{ENV}")).json()  # 404 until the first poll
        return bool(view.get("waiting_polls") == count)

    await eventually(parked, timeout=5, interval=0.005, message=f"{count} polls waiting")


async def test_omitted_block_ms_returns_at_once_with_null(api: Api, flavour: Flavour) -> None:
    started = time.monotonic()
    response = await api.poll(flavour)
    assert response.status_code == 200 and response.content == b"null" and response.json() is None
    assert time.monotonic() - started < 0.2


async def test_null_after_block_ms(api: Api, flavour: Flavour) -> None:
    started = time.monotonic()
    response = await api.poll(flavour, block_ms=250)
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json() is None
    assert 0.24 <= elapsed < 0.45, elapsed


async def test_waiting_poll_wakes_as_soon_as_an_item_arrives(api: Api, flavour: Flavour) -> None:
    poll = asyncio.ensure_future(api.poll(flavour, "w1", block_ms=999))
    await _waiting_polls(api, 1)
    started = time.monotonic()
    [item] = await api.enqueue()
    response = await poll
    assert response.json()["id"] == item["id"]
    assert time.monotonic() - started < 0.15, "woken by the enqueue, not by block_ms"


async def test_one_new_item_wakes_one_waiting_poll(api: Api) -> None:
    polls = [asyncio.ensure_future(api.poll(QODER, f"w{i}", block_ms=600)) for i in range(4)]
    await _waiting_polls(api, 4)
    items = await api.enqueue(2)
    done, pending = await asyncio.wait(polls, timeout=0.3)
    assert len(done) == 2, "exactly the two items' waiters answered at once"
    assert {task.result().json()["id"] for task in done} == {item["id"] for item in items}
    for task in pending:
        assert (await task).json() is None


@pytest.mark.parametrize("block_ms", ["0", "1000", "-1", "x", "", "1.5"])
async def test_block_ms_validation(api: Api, flavour: Flavour, block_ms: str) -> None:
    response = await api.poll(flavour, block_ms=block_ms)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_block_ms_bounds_are_accepted(api: Api) -> None:
    assert (await api.poll(ANTHROPIC, block_ms=1)).status_code == 200
    await api.enqueue()
    assert (await api.poll(ANTHROPIC, block_ms=999)).json() is not None


async def test_reclaim_returns_polled_but_unacked_items(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue()
    assert (await api.polled(flavour, "w1"))["id"] == item["id"]
    assert (await api.poll(flavour, "w2")).json() is None, "pending: not reclaimable within 5000 ms"
    again = await api.polled(flavour, "w2", reclaim_older_than_ms=0)
    assert again["id"] == item["id"] and again["state"] == "queued"
    view = await api.view(item["id"])
    assert view["polled_by"] == "w2" and view["deliveries"] == 2 and view["queue"] == "pending"
    assert (await api.poll(flavour, reclaim_older_than_ms=-1)).status_code == 400


async def test_reclaim_default_is_a_setting(api: Api) -> None:
    api.emulator.update_settings(reclaim_default_ms=50)
    [item] = await api.enqueue()
    await api.polled(ANTHROPIC, "w1")
    started = time.monotonic()
    again = await api.polled(ANTHROPIC, "w2", block_ms=999)
    assert again["id"] == item["id"]
    assert time.monotonic() - started < 0.3, "a waiting poll wakes when a pending item becomes reclaimable"


async def test_ready_items_come_out_oldest_first(api: Api) -> None:
    ids = [item["id"] for item in await api.enqueue(3)]
    assert [(await api.polled(QODER))["id"] for _ in ids] == ids


async def test_shutdown_answers_waiting_polls_at_once() -> None:
    emulator = Emulator(EmulatorSettings(key=KEY))
    async with httpx.AsyncClient(timeout=5) as http:
        async with emulator.serve() as url:
            poll = asyncio.ensure_future(
                http.get(url + QODER.prefix() + "/poll", params={"block_ms": 999}, headers=QODER.headers)
            )

            async def parked() -> bool:
                view = (await http.get(f"{url}/_emulator/environments/{ENV}")).json()
                return bool(view.get("waiting_polls") == 1)

            await eventually(parked, timeout=5, interval=0.005)
            started = time.monotonic()
        assert time.monotonic() - started < 0.5, "the server stopped without waiting for block_ms"
        response = await poll
        assert response.status_code == 200 and response.json() is None


async def test_cancelled_waiter_passes_its_wake_up_on() -> None:
    """A poll woken for an item but cancelled before it takes it (e.g. at shutdown) hands the wake-up to the next
    waiting poll: no item is left waiting for a block_ms timeout. (In process: cancelling an HTTP request does
    not cancel the server's handler.)"""
    emulator = Emulator(EmulatorSettings(key=KEY))
    store = emulator.app.store
    assert isinstance(store, MemoryStore)  # the default store: this test reads its parked waiters
    first = asyncio.ensure_future(store.poll(ENV, "w1", 999, None))
    second = asyncio.ensure_future(store.poll(ENV, "w2", 999, None))
    await eventually(lambda: len(store.environment(ENV).waiters) == 2, timeout=2, interval=0.001)
    started = time.monotonic()
    emulator.enqueue(ENV)  # wakes the first waiter only
    first.cancel()  # ...which is cancelled before it runs
    taken = await second
    assert taken is not None and time.monotonic() - started < 0.2
    assert first.cancelled()
