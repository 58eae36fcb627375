"""The fault proxy itself, against the real emulator: each action does what the table in `chaos/proxy.py` says."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from chaos.harness import KEY, Emulator
from chaos.proxy import Proxy, Rule, classify

HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"}
BASE = "/v1/environments/env_p/work"


def test_classify_every_operation() -> None:
    assert classify("GET", f"{BASE}/poll", {}) == ("poll", "env_p", None)
    assert classify("POST", f"{BASE}/w1/ack", {}) == ("ack", "env_p", "w1")
    assert classify("POST", f"{BASE}/w1/heartbeat", {"expected_last_heartbeat": "NO_HEARTBEAT"})[0] == "claim"
    assert classify("POST", f"{BASE}/w1/heartbeat", {"expected_last_heartbeat": "2026-01-01T00:00:00Z"})[0] == (
        "heartbeat"
    )
    assert classify("POST", f"{BASE}/w1/stop", {})[0] == "stop"
    assert classify("GET", f"{BASE}/w1", {})[0] == "get"
    assert classify("POST", f"{BASE}/w1", {})[0] == "update"
    assert classify("GET", BASE, {})[0] == "list"
    assert classify("GET", f"{BASE}/stats", {})[0] == "stats"
    assert classify("GET", "/api/v1/cloud/environments/e/work/poll", {})[0] == "poll"
    assert classify("GET", "/_emulator/stats", {})[0] is None


def test_rules_reject_unknown_names() -> None:
    with pytest.raises(ValueError, match="operation"):
        Rule(operation="pol")
    with pytest.raises(ValueError, match="mutation"):
        Rule(action="mutate", mutation="nope")


async def test_pass_status_mutate_drop_and_counts(emulator: Emulator, proxy: Proxy) -> None:
    [work_id] = await emulator.enqueue("env_p", 1)
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        proxy.add(operation="poll", action="status", status=503, retry_after_ms=5, count=1)
        refused = await http.get(f"{BASE}/poll")
        assert refused.status_code == 503 and refused.headers["retry-after-ms"] == "5"
        polled = await http.get(f"{BASE}/poll")
        assert polled.status_code == 200 and polled.json()["id"] == work_id
        assert proxy.secrets, "the item secret in the poll answer was collected for the leak check"
        await http.post(f"{BASE}/{work_id}/ack")
        proxy.add(operation="claim", action="mutate", mutation="ttl_nan", count=1)
        claimed = await http.post(f"{BASE}/{work_id}/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"})
        assert math.isnan(json.loads(claimed.text)["ttl_seconds"])
        assert (await emulator.item("env_p", work_id))["state"] == "active", "mutate forwards the request first"
        proxy.add(operation="stop", action="drop", forward_first=True, count=1)
        with pytest.raises(httpx.TransportError):
            await http.post(f"{BASE}/{work_id}/stop", json={"force": True})
        assert (await emulator.item("env_p", work_id))["state"] == "stopped", "forward_first: the stop happened"
    assert proxy.count("poll") == 2 and proxy.count("poll", "status") == 1 and proxy.count("stop", "drop") == 1


async def test_drip_and_hang(proxy: Proxy) -> None:
    proxy.add(operation="stats", action="drip", interval=0.2, body="null")
    proxy.add(operation="poll", action="hang")
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS) as http:
        started = time.monotonic()
        dripped = await http.get(f"{BASE}/stats", timeout=10)
        assert dripped.text == "null" and time.monotonic() - started >= 0.6  # 4 bytes, 0.2 s apart
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{BASE}/poll", timeout=0.5)


async def test_huge_body_is_streamed(proxy: Proxy) -> None:
    proxy.add(operation="poll", action="huge", size=8 * 2**20, count=1)
    async with (
        httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=30) as http,
        http.stream("GET", f"{BASE}/poll") as answer,
    ):
        size = sum([len(chunk) async for chunk in answer.aiter_bytes()])
    assert size == 8 * 2**20


async def test_admin_rules_api(proxy: Proxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url or "", timeout=10) as http:
        added = await http.post("/_chaos/rules", json={"operation": "ack", "action": "status", "status": 500})
        assert added.status_code == 200 and added.json()["rule"]["status"] == 500
        assert (await http.post("/_chaos/rules", json={"action": "explode"})).status_code == 400
        assert len((await http.get("/_chaos/rules")).json()["data"]) == 1
        assert (await http.delete("/_chaos/rules")).json()["data"] == []
    await asyncio.sleep(0)
