"""The admin API under /_emulator/ and the Emulator's Python API: enqueue, the request log, faults (status with
retry headers, latency, dropped connections), settings, environments, stats and reset."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from sidecar.emulator import ApiError
from tests.helpers import eventually

from .conftest import ANTHROPIC, ENV, QODER, Api, Flavour


async def test_enqueue_validation(api: Api) -> None:
    url = f"/_emulator/environments/{ENV}/work"
    for bad in ({"count": 0}, {"count": -1}, {"count": "2"}, {"count": 100_001}, {"data_type": "batch"}):
        assert (await api.http.post(url, json=bad)).status_code == 400, bad
    assert (await api.http.post(url, json={"metadata": {"a": 1}})).status_code == 400
    assert (await api.http.post(url, content=b"[1]")).status_code == 400
    curl_style = await api.http.post(url, content=b'{"count":2}', headers={"content-type": "x-www-form-urlencoded"})
    assert len(curl_style.json()["data"]) == 2
    assert len((await api.http.post(url)).json()["data"]) == 1, "count defaults to 1"
    listed = (await api.http.get(url)).json()["data"]
    assert len(listed) == 3 and all(view["queue"] == "ready" for view in listed)


async def test_request_log_in_arrival_order(api: Api) -> None:
    poll = asyncio.ensure_future(api.poll(QODER, "w1", block_ms=999))

    async def logged() -> bool:
        return len(await api.requests()) == 1

    await eventually(logged, timeout=5, interval=0.005)
    await api.call(ANTHROPIC, "GET", "/stats", params={"x": "1"})
    first, second = await api.requests()
    assert first["operation"] == "poll" and first["status"] is None, "in flight"
    assert second["operation"] == "stats" and second["status"] == 200
    await api.enqueue()
    await poll
    first, second = await api.requests()
    assert first["status"] == 200 and first["seq"] < second["seq"]
    assert first["query"] == {"block_ms": "999"} and first["worker_id"] == "w1" and first["flavour"] == "qoder"
    assert {"method", "path", "query", "status", "at", "operation", "environment_id", "request_id"} <= set(first)
    assert first["path"] == QODER.prefix() + "/poll" and first["method"] == "GET" and first["at"].endswith("Z")
    assert second["query"] == {"x": "1"} and second["environment_id"] == ENV


async def test_request_log_since_clear_and_bound(api: Api) -> None:
    for _ in range(3):
        await api.call(QODER, "GET", "/stats")
    body = (await api.http.get("/_emulator/requests", params={"since": 1})).json()
    assert [e["seq"] for e in body["data"]] == [1, 2] and body["next"] == 3
    assert (await api.http.get("/_emulator/requests", params={"since": "x"})).status_code == 400
    assert (await api.http.delete("/_emulator/requests")).status_code == 200
    assert await api.requests() == []
    api.emulator.update_settings(request_log_limit=2)
    for _ in range(3):
        await api.call(QODER, "GET", "/stats")
    assert [e["seq"] for e in await api.requests()] == [4, 5], "bounded: oldest dropped first"
    assert [e["seq"] for e in api.emulator.requests_since(5)] == [5]
    api.emulator.update_settings(request_log_limit=0)
    await api.call(QODER, "GET", "/stats")
    assert await api.requests() == []
    assert api.emulator.request_counts()["stats"]["200"] == 7, "counts survive the log's bound"


async def test_fault_status_with_retry_headers_for_the_next_k_requests(api: Api, flavour: Flavour) -> None:
    fault = {"operation": "stats", "status": 503, "count": 2, "retry_after": 1, "retry_after_ms": "1000"}
    added = await api.http.post("/_emulator/faults", json=fault | {"should_retry": True})
    assert added.status_code == 200 and added.json()["fault"]["count"] == 2
    for _ in range(2):
        response = await api.call(flavour, "GET", "/stats")
        assert response.status_code == 503 and response.json()["error"]["type"] == "api_error"
        assert response.headers["retry-after"] == "1" and response.headers["retry-after-ms"] == "1000"
        assert response.headers["x-should-retry"] == "true"
        assert response.json()["request_id"] == response.headers["request-id"]
    assert (await api.call(flavour, "GET", "/stats")).status_code == 200
    assert [e["status"] for e in await api.requests("stats")] == [503, 503, 200]
    assert (await api.http.get("/_emulator/faults")).json()["data"] == []


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(429, "rate_limit_error"), (500, "api_error"), (504, "timeout_error"), (529, "overloaded_error")],
)
async def test_fault_error_types(api: Api, status: int, error_type: str) -> None:
    await api.http.post("/_emulator/faults", json={"operation": "poll", "status": status})
    response = await api.poll(ANTHROPIC)
    assert response.status_code == status and response.json()["error"]["type"] == error_type


async def test_fault_scope_environment_wildcard_and_until_cleared(api: Api) -> None:
    await api.http.post(
        "/_emulator/faults", json={"operation": "*", "status": 500, "count": None, "environment_id": ENV}
    )
    for _ in range(3):
        assert (await api.call(QODER, "GET", "/stats")).status_code == 500
        assert (await api.poll(QODER)).status_code == 500
    assert (await api.call(QODER, "GET", "/stats", environment_id="env_other")).status_code == 200
    [fault] = (await api.http.get("/_emulator/faults")).json()["data"]
    assert (await api.http.delete(f"/_emulator/faults/{fault['id']}")).status_code == 200
    assert (await api.http.delete(f"/_emulator/faults/{fault['id']}")).status_code == 404
    assert (await api.call(QODER, "GET", "/stats")).status_code == 200


async def test_fault_validation(api: Api) -> None:
    for bad in (
        {"operation": "nope", "status": 500},
        {"operation": "poll"},
        {"operation": "poll", "status": 200},
        {"operation": "poll", "status": 500, "drop": True},
        {"operation": "poll", "status": 500, "count": 0},
        {"operation": "poll", "latency_ms": -1},
        {"operation": "poll", "status": 500, "surprise": 1},
    ):
        assert (await api.http.post("/_emulator/faults", json=bad)).status_code == 400, bad


async def test_fault_latency(api: Api) -> None:
    await api.http.post("/_emulator/faults", json={"operation": "heartbeat", "latency_ms": 200, "count": 1})
    await api.http.post("/_emulator/faults", json={"operation": "heartbeat", "status": 429, "count": 1})
    started = time.monotonic()
    response = await api.heartbeat(ANTHROPIC, "work_x")
    assert response.status_code == 429, "latency and an error combine"
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    assert (await api.heartbeat(ANTHROPIC, "work_x")).status_code == 404
    assert time.monotonic() - started < 0.15


async def test_dropped_connection_is_a_transport_error(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue()
    api.emulator.inject_fault("poll", drop=True, count=1)
    with pytest.raises(httpx.TransportError) as caught:
        await api.poll(flavour)
    assert isinstance(caught.value, httpx.RemoteProtocolError | httpx.ReadError)
    assert (await api.polled(flavour))["id"] == item["id"], "the next request is served"
    assert [e["status"] for e in await api.requests("poll")] == [0, 200]


async def test_settings_read_and_change(api: Api) -> None:
    settings = (await api.http.get("/_emulator/settings")).json()
    assert settings["key"] == "<redacted>" and settings["min_ttl_seconds"] == 1 and settings["management_key"] is None
    changed = await api.http.patch("/_emulator/settings", json={"max_ttl_seconds": 5, "management_key": "m-key"})
    assert changed.json()["max_ttl_seconds"] == 5 and changed.json()["management_key"] == "<redacted>"
    assert api.emulator.settings.max_ttl_seconds == 5
    for bad in (
        {"key": "x"},
        {"nope": 1},
        {"min_ttl_seconds": "x"},
        {"min_ttl_seconds": 10},
        {"id_style": "other"},
        {"strip_secret_padding_every": True},
    ):
        assert (await api.http.patch("/_emulator/settings", json=bad)).status_code == 400, bad
    assert api.emulator.settings.max_ttl_seconds == 5
    assert "m-key" not in repr(api.emulator.settings) and "sk-ant" not in repr(api.emulator.settings)


async def test_environment_admin(api: Api) -> None:
    assert (await api.http.get("/_emulator/environments/env_new")).status_code == 404
    made = await api.http.put("/_emulator/environments/env_new", json={"self_hosted": False})
    assert made.json() | {"states": {}} == {
        "id": "env_new",
        "self_hosted": False,
        "permitted": True,
        "items": 0,
        "states": {},
        "waiting_polls": 0,
    }
    assert (await api.http.put("/_emulator/environments/env_new", json={"self_hosted": "no"})).status_code == 400
    assert (await api.http.put("/_emulator/environments/env_new", json={"color": "red"})).status_code == 400
    api.emulator.update_settings(auto_create_environments=False)
    assert (await api.call(QODER, "GET", "/stats", environment_id="env_unknown")).status_code == 404
    await api.enqueue(environment_id="env_made_by_enqueue")
    assert (await api.call(QODER, "GET", "/stats", environment_id="env_made_by_enqueue")).json()["depth"] == 1


async def test_stats_and_reset(api: Api) -> None:
    work, _ = await api.claim(ANTHROPIC)
    await api.heartbeat(ANTHROPIC, work["id"], "stale")
    stats = (await api.http.get("/_emulator/stats")).json()
    assert stats["requests"]["heartbeat"] == {"200": 1, "412": 1} and stats["requests"]["poll"] == {"200": 1}
    assert stats["total"] == 4 and stats["in_flight"] == 0 and stats["environments"] == 1
    api.emulator.inject_fault("stats", status=500, count=None)
    api.emulator.update_settings(default_ttl_seconds=7)
    assert (await api.http.post("/_emulator/reset")).status_code == 200
    assert await api.requests() == [] and (await api.http.get("/_emulator/faults")).json()["data"] == []
    assert (await api.http.get(f"/_emulator/environments/{ENV}/work/{work['id']}")).status_code == 404
    assert (await api.call(ANTHROPIC, "GET", "/stats")).json()["depth"] == 0
    assert api.emulator.settings.default_ttl_seconds == 7, "settings survive a reset"


async def test_python_api(api: Api) -> None:
    emulator = api.emulator
    [item] = emulator.enqueue(ENV, metadata={"k": "v"})
    assert item["state"] == "queued" and item["metadata"] == {"k": "v"}
    poll = await api.polled(QODER, "w")
    assert poll["id"] == item["id"]
    await api.ack(QODER, item["id"], "w")
    beat = (await api.heartbeat(QODER, item["id"], "NO_HEARTBEAT", 30)).json()
    view = emulator.get_item(ENV, item["id"])
    assert view["state"] == "active" and view["last_heartbeat"] == beat["last_heartbeat"]
    assert view["holder"] == "w" and 29 < view["lease_expires_in_seconds"] <= 30 and view["lease_expires_at"]
    stolen = emulator.steal_lease(ENV, item["id"])
    assert stolen["last_heartbeat"] > beat["last_heartbeat"]
    assert [e["operation"] for e in emulator.requests] == ["poll", "ack", "heartbeat"]
    assert emulator.queue_stats(ENV)["depth"] == 0 and len(emulator.items(ENV)) == 1
    with pytest.raises(ApiError) as caught:
        emulator.get_item(ENV, "work_nope")
    assert caught.value.status == 404
    with pytest.raises(ApiError):
        emulator.inject_fault("nope", status=500)
    with pytest.raises(ValueError, match="min_ttl_seconds"):
        emulator.update_settings(min_ttl_seconds=0)
    emulator.reset()
    assert emulator.requests == [] and emulator.request_counts() == {}
