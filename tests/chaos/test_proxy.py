"""The fault proxy itself, against the real emulator: each action does what the table in `chaos/proxy.py` says."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import pytest

from chaos.harness import KEY, Emulator
from chaos.proxy import Event, Proxy, Rule, classify

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


# -- faults after the Work API applied the request ----------------------------------------------------------


class Raw:
    """One kept-alive HTTP/1.1 connection to the proxy, bytes as sent (for answers no HTTP client would parse)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").split(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    def send(self, method: str, target: str) -> None:
        lines = [f"{method} {target} HTTP/1.1", "host: chaos", "content-length: 0"]
        lines += [f"{name}: {value}" for name, value in HEADERS.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def answer(self) -> tuple[bytes, bytes]:
        """One answer framed by its Content-Length: (head, body)."""
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
        return head, await asyncio.wait_for(self.reader.readexactly(length), 10)

    async def rest(self, timeout: float = 10) -> bytes:
        """Everything until the proxy closes the connection."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    def close(self) -> None:
        self.writer.close()


async def _acked(emulator: Emulator, http: httpx.AsyncClient) -> str:
    [work_id] = await emulator.enqueue("env_p", 1)
    assert (await http.get(f"{BASE}/poll")).json()["id"] == work_id
    return work_id


async def test_twice_sends_a_stray_second_answer_on_the_same_connection(emulator: Emulator, proxy: Proxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
    proxy.add(operation="ack", action="twice", stray="later", interval=0.2, count=1)
    raw = await Raw.open(proxy.url or "")
    try:
        raw.send("POST", f"{BASE}/{work_id}/ack")
        head, body = await raw.answer()
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["id"] == work_id
        assert (await emulator.item("env_p", work_id))["state"] == "starting", "the ack was applied"
        started = time.monotonic()
        stray_head, stray_body = await raw.answer()  # nothing was asked: a stray answer on the kept-alive connection
        assert stray_head.startswith(b"HTTP/1.1 200") and stray_body == b"{}"
        assert time.monotonic() - started >= 0.1, "the stray came `interval` after the real answer"
        raw.send("GET", f"{BASE}/stats")  # and the connection still serves the next request
        head, body = await raw.answer()
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["type"] == "work_queue_stats"
    finally:
        raw.close()


async def test_a_stray_answer_meets_the_next_request_on_the_connection(emulator: Emulator, proxy: Proxy) -> None:
    """The default timing: the ack's stray second answer is what the claim sent next on that connection reads."""
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
    proxy.add(operation="ack", action="twice", count=1)
    raw = await Raw.open(proxy.url or "")
    try:
        raw.send("POST", f"{BASE}/{work_id}/ack")
        _, body = await raw.answer()
        assert json.loads(body)["id"] == work_id
        raw.send("POST", f"{BASE}/{work_id}/heartbeat?expected_last_heartbeat=NO_HEARTBEAT")
        _, stray = await raw.answer()
        assert stray == b"{}", "the claim's first answer is the ack's stray"
        _, real = await raw.answer()
        assert json.loads(real)["state"] == "active", "the claim's real answer follows it"
    finally:
        raw.close()


@pytest.mark.parametrize("framing", ["cl_chunked", "two_cl", "cl_short"])
async def test_framing_contradicts_itself_after_the_request_was_applied(
    emulator: Emulator, proxy: Proxy, framing: str
) -> None:
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
    proxy.add(operation="ack", action="framing", framing=framing, count=1)
    raw = await Raw.open(proxy.url or "")
    try:
        raw.send("POST", f"{BASE}/{work_id}/ack")
        answer = await raw.rest()
    finally:
        raw.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lengths = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    assert (await emulator.item("env_p", work_id))["state"] == "starting", "the ack was applied"
    if framing == "cl_chunked":
        assert len(lengths) == 1 and b"transfer-encoding: chunked" in head.lower() and body.endswith(b"0\r\n\r\n")
    elif framing == "two_cl":
        assert len(lengths) == 2 and lengths[0] != lengths[1]
    else:
        assert int(lengths[0][15:]) == len(body) - 2, "two bytes after the announced body"


async def test_header_block_is_as_large_as_asked(emulator: Emulator, proxy: Proxy) -> None:
    proxy.add(operation="stats", action="header_block", size=300_000, count=1)
    raw = await Raw.open(proxy.url or "")
    try:
        raw.send("GET", f"{BASE}/stats")
        answer = await raw.rest()
    finally:
        raw.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert len(head) > 300_000 and json.loads(body)["type"] == "work_queue_stats"


@pytest.mark.parametrize("forward_first", [False, True])
async def test_reset_hits_a_reused_connection_only(emulator: Emulator, proxy: Proxy, forward_first: bool) -> None:
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
    proxy.add(operation="*", action="reset", forward_first=forward_first, count=1)
    raw = await Raw.open(proxy.url or "")
    try:
        raw.send("GET", f"{BASE}/stats")  # a new connection's first request is never reset
        head, _ = await raw.answer()
        assert head.startswith(b"HTTP/1.1 200")
        raw.send("POST", f"{BASE}/{work_id}/ack")  # its second one is
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await raw.answer()
    finally:
        raw.close()
    state = (await emulator.item("env_p", work_id))["state"]
    assert state == ("starting" if forward_first else "queued"), "reset after forwarding: the ack was applied"
    assert [e.reused for e in proxy.events] == [False, False, True] and proxy.count("ack", "reset") == 1


async def test_hang_and_late_after_the_request_was_applied(emulator: Emulator, proxy: Proxy) -> None:
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
        proxy.add(operation="ack", action="hang", forward_first=True, count=1)
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{BASE}/{work_id}/ack", timeout=1)
        assert (await emulator.item("env_p", work_id))["state"] == "starting", "hang after forwarding: applied"
        proxy.add(operation="claim", action="late", interval=0.6, count=1)
        started = time.monotonic()
        late = await http.post(f"{BASE}/{work_id}/heartbeat", params={"expected_last_heartbeat": "NO_HEARTBEAT"})
        assert late.status_code == 200 and time.monotonic() - started >= 0.6
        heartbeat = await http.post(
            f"{BASE}/{work_id}/heartbeat", params={"expected_last_heartbeat": late.json()["last_heartbeat"]}
        )
        assert heartbeat.status_code == 200
    intact = proxy.intact_renewals(deadline=0.5)
    assert len(intact[work_id]) == 1, "the late claim is not a success the client heard in time; the renewal is"


def test_a_claim_call_begins_after_its_ack() -> None:
    """The failed claims of a hand-over that gave up are not part of the claim of a later delivery of the item:
    that claim's call began after its own ack, not seconds before it."""
    proxy = Proxy("http://127.0.0.1:1")
    proxy.events += [
        Event(10.0, "ack", "w1", "pass", None, status=409, took=0.001),
        Event(10.1, "claim", "w1", "pass", None, status=412, took=0.001),  # a hand-over that gives up
        Event(10.5, "claim", "w1", "status", 1),
        Event(30.0, "ack", "w1", "pass", None, status=200, took=0.001),  # the item delivered again
        Event(30.2, "claim", "w1", "status", 1),
        Event(30.4, "claim", "w1", "pass", None, status=200, took=0.001),
    ]
    assert proxy.intact_renewals(deadline=1.0) == {"w1": [30.2]}


async def test_a_success_counts_from_the_first_failed_attempt_of_its_call(emulator: Emulator, proxy: Proxy) -> None:
    """The fence clock of a claim that succeeded on its second attempt starts at the first (refused 503)."""
    async with httpx.AsyncClient(base_url=proxy.url or "", headers=HEADERS, timeout=10) as http:
        work_id = await _acked(emulator, http)
        await http.post(f"{BASE}/{work_id}/ack")
        proxy.add(operation="claim", action="status", status=503, count=1)
        claim = {"expected_last_heartbeat": "NO_HEARTBEAT"}
        assert (await http.post(f"{BASE}/{work_id}/heartbeat", params=claim)).status_code == 503
        await asyncio.sleep(0.3)
        claimed = await http.post(f"{BASE}/{work_id}/heartbeat", params=claim)
        assert claimed.status_code == 200
    first, second = (e.at for e in proxy.events if e.operation == "claim")
    assert second - first >= 0.3
    assert proxy.intact_renewals(deadline=1.0) == {work_id: [first]}
