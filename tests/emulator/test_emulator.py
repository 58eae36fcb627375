"""The emulator's own rules, over real HTTP: long polls, reclaim, lease expiry, the `starting` strand,
request ids, flavour headers, and the admin API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from sidecar.emulator import Emulator, EmulatorSettings
from tests.helpers import eventually

KEY = "sk-emulator-test-key"
ENV = "env_emulator"
A = f"/v1/environments/{ENV}/work"
Q = f"/api/v1/cloud/environments/{ENV}/work"
A_HEADERS = {
    "authorization": f"Bearer {KEY}",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "managed-agents-2026-04-01",
}
Q_HEADERS = {"authorization": f"Bearer {KEY}"}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


async def _enqueue(http: httpx.AsyncClient, count: int = 1, **extra: Any) -> list[dict[str, Any]]:
    response = await http.post(f"/_emulator/environments/{ENV}/work", json={"count": count, **extra})
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()["data"]
    return items


async def _claim(http: httpx.AsyncClient, ttl: int = 1) -> tuple[str, str]:
    work = (await http.get(f"{A}/poll", headers=A_HEADERS)).json()
    assert (await http.post(f"{A}/{work['id']}/ack", headers=A_HEADERS)).status_code == 200
    beat = await http.post(
        f"{A}/{work['id']}/heartbeat",
        params={"expected_last_heartbeat": "NO_HEARTBEAT", "desired_ttl_seconds": ttl},
        headers=A_HEADERS,
    )
    return work["id"], beat.json()["last_heartbeat"]


async def test_long_poll_returns_null_after_block_ms(http: httpx.AsyncClient) -> None:
    started = time.monotonic()
    response = await http.get(f"{A}/poll", params={"block_ms": 300}, headers=A_HEADERS)
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and response.json() is None
    assert 0.28 <= elapsed < 0.6


async def test_long_poll_wakes_at_once(http: httpx.AsyncClient) -> None:
    poll = asyncio.ensure_future(http.get(f"{Q}/poll", params={"block_ms": 999}, headers=Q_HEADERS))

    async def waiting() -> bool:  # the poll is parked server-side
        return bool((await http.get(f"/_emulator/environments/{ENV}")).json().get("waiting_polls") == 1)

    await eventually(waiting, timeout=5, interval=0.005)
    started = time.monotonic()
    [item] = await _enqueue(http)
    response = await poll
    assert response.json()["id"] == item["id"]
    assert time.monotonic() - started < 0.2


@pytest.mark.parametrize("block_ms", ["0", "1000", "x"])
async def test_block_ms_validation(http: httpx.AsyncClient, block_ms: str) -> None:
    response = await http.get(f"{A}/poll", params={"block_ms": block_ms}, headers=A_HEADERS)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_reclaim_returns_unacked_items(http: httpx.AsyncClient) -> None:
    [item] = await _enqueue(http)
    first = (await http.get(f"{A}/poll", headers={**A_HEADERS, "anthropic-worker-id": "w1"})).json()
    assert first["id"] == item["id"]
    assert (await http.get(f"{A}/poll", headers=A_HEADERS)).json() is None, "pending, not reclaimable yet"
    again = await http.get(f"{A}/poll", params={"reclaim_older_than_ms": 0}, headers=A_HEADERS)
    assert again.json()["id"] == item["id"]
    stats = (await http.get(f"{A}/stats", headers=A_HEADERS)).json()
    assert stats["pending"] == 1 and stats["workers_polling"] >= 1


async def test_lease_expiry_requeues_and_wakes_a_poll(http: httpx.AsyncClient) -> None:
    await _enqueue(http)
    work_id, last = await _claim(http, ttl=1)
    woke = await http.get(f"{Q}/poll", params={"block_ms": 999}, headers=Q_HEADERS)
    if woke.json() is None:  # expiry is 1 s; one more long poll covers it
        woke = await http.get(f"{Q}/poll", params={"block_ms": 999}, headers=Q_HEADERS)
    assert woke.json()["id"] == work_id and woke.json()["state"] == "queued"
    stale = await http.post(f"{A}/{work_id}/heartbeat", params={"expected_last_heartbeat": last}, headers=A_HEADERS)
    assert stale.status_code == 412
    assert stale.json()["error"]["details"]["current_state"]["state"] == "queued"


async def test_acked_never_heartbeated_stays_starting(http: httpx.AsyncClient) -> None:
    [item] = await _enqueue(http)
    await http.get(f"{A}/poll", headers=A_HEADERS)
    await http.post(f"{A}/{item['id']}/ack", headers=A_HEADERS)
    await _enqueue(http)
    witness, _ = await _claim(http, ttl=1)  # a 1 s lease that does run out meanwhile

    async def witness_requeued() -> bool:
        view = (await http.get(f"/_emulator/environments/{ENV}/work/{witness}")).json()
        return bool(view["state"] == "queued")

    await eventually(witness_requeued, timeout=5, interval=0.02)
    view = (await http.get(f"/_emulator/environments/{ENV}/work/{item['id']}")).json()
    assert view["state"] == "starting", "the real API strands it too; the sidecar must never do this"


async def test_ttl_is_clamped_and_validated(http: httpx.AsyncClient) -> None:
    await _enqueue(http)
    work_id, last = await _claim(http, ttl=5000)
    beat = await http.post(
        f"{A}/{work_id}/heartbeat",
        params={"expected_last_heartbeat": last, "desired_ttl_seconds": 5000},
        headers=A_HEADERS,
    )
    assert beat.json()["ttl_seconds"] == 600
    for bad in ("0", "-1", "1.5", "x"):
        response = await http.post(f"{A}/{work_id}/heartbeat", params={"desired_ttl_seconds": bad}, headers=A_HEADERS)
        assert response.status_code == 400


async def test_graceful_stop_is_reported_by_the_next_heartbeat(http: httpx.AsyncClient) -> None:
    await _enqueue(http)
    work_id, last = await _claim(http, ttl=30)
    stopping = await http.post(f"{A}/{work_id}/stop", headers=A_HEADERS)  # empty body: graceful
    assert stopping.json()["state"] == "stopping" and stopping.json()["stop_requested_at"]
    beat = await http.post(f"{A}/{work_id}/heartbeat", params={"expected_last_heartbeat": last}, headers=A_HEADERS)
    assert beat.json()["state"] == "stopping"
    done = await http.post(f"{A}/{work_id}/stop", json={"force": True}, headers=A_HEADERS)
    assert done.json()["state"] == "stopped"
    again = await http.post(f"{A}/{work_id}/stop", json={"force": True}, headers=A_HEADERS)
    assert again.status_code == 409


async def test_request_id_on_every_response(http: httpx.AsyncClient) -> None:
    ok = await http.get(f"{A}/stats", headers=A_HEADERS)
    missing = await http.get(f"{A}/nope/extra/path", headers=A_HEADERS)
    unauth = await http.get(f"{A}/stats")
    for response in (ok, missing, unauth):
        assert response.headers["request-id"].startswith("req_")
    assert unauth.status_code == 401 and unauth.json()["request_id"] == unauth.headers["request-id"]
    chosen = await http.get(f"{Q}/stats", headers={**Q_HEADERS, "x-request-id": "req_mine"})
    assert chosen.headers["request-id"] == "req_mine"


async def test_flavour_credentials_and_headers(http: httpx.AsyncClient) -> None:
    assert (
        await http.get(f"{A}/stats", headers={**A_HEADERS, "authorization": "", "x-api-key": KEY})
    ).status_code == 200
    assert (await http.get(f"{Q}/stats", headers={"x-api-key": KEY})).status_code == 401, "Qoder: Bearer only"
    no_beta = {k: v for k, v in A_HEADERS.items() if k != "anthropic-beta"}
    assert (await http.get(f"{A}/stats", headers=no_beta)).status_code == 400


async def test_secret_only_on_polled_anthropic_items(http: httpx.AsyncClient) -> None:
    await _enqueue(http, 2)
    polled = (await http.get(f"{A}/poll", headers=A_HEADERS)).json()
    assert polled["secret"]
    assert (await http.get(f"{A}/{polled['id']}", headers=A_HEADERS)).json()["secret"] is None
    qoder = (await http.get(f"{Q}/poll", headers=Q_HEADERS)).json()
    assert qoder["secret"] is None


async def test_admin_validation_faults_and_reset(http: httpx.AsyncClient) -> None:
    assert (await http.post(f"/_emulator/environments/{ENV}/work", json={"count": 0})).status_code == 400
    assert (await http.post("/_emulator/faults", json={"operation": "nope", "status": 500})).status_code == 400
    await http.post("/_emulator/faults", json={"operation": "stats", "latency_ms": 200})
    started = time.monotonic()
    await http.get(f"{A}/stats", headers=A_HEADERS)
    assert time.monotonic() - started >= 0.2
    settings = (await http.patch("/_emulator/settings", json={"default_ttl_seconds": 30})).json()
    assert settings["default_ttl_seconds"] == 30 and settings["key"] == "<redacted>"
    assert (await http.patch("/_emulator/settings", json={"key": "x"})).status_code == 400
    await _enqueue(http, 3)
    counts = (await http.get("/_emulator/stats")).json()
    assert counts["requests"]["stats"]["200"] >= 1
    await http.post("/_emulator/reset")
    assert (await http.get("/_emulator/requests")).json()["data"] == []
    assert (await http.get(f"{A}/stats", headers=A_HEADERS)).json()["depth"] == 0


async def test_request_log_shape(http: httpx.AsyncClient) -> None:
    await http.get(f"{A}/poll", params={"block_ms": 5}, headers=A_HEADERS)
    [entry] = (await http.get("/_emulator/requests")).json()["data"]
    assert {"method", "path", "query", "status", "at"} <= set(entry)
    assert entry["query"] == {"block_ms": "5"} and entry["operation"] == "poll" and entry["status"] == 200
