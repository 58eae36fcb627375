"""The Work API client against the emulator: the whole lifecycle in both flavours, every error row of
the seed documents mapped to its exception, and retries with deadlines."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.emulator import Emulator
from sidecar.workapi import (
    HTTP_BACKENDS,
    NO_HEARTBEAT,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    LeaseLostError,
    NotFoundError,
    PermissionDeniedError,
    RequestTimeout,
    RetryPolicies,
    RetryPolicy,
    ServerError,
    Timeouts,
    TransportError,
    WorkApiClient,
)
from sidecar.workapi._client import _quote

from .conftest import ENV, KEY, MANAGEMENT_KEY, ClientFactory, admin_client, enqueue, fault, requests

Emu = tuple[Emulator, str, httpx.AsyncClient]


async def test_lifecycle(emulator: Emu, make_client: ClientFactory, provider: str) -> None:
    _, _, admin = emulator
    client = await make_client(provider)
    assert await client.poll() is None  # nothing queued: returns at once
    [queued] = await enqueue(admin)
    work = await client.poll(block_ms=500)
    assert work is not None and work.id == queued["id"] and work.state == "queued"
    assert work.session_id == queued["data"]["id"]
    if provider == "anthropic":
        assert work.secret is not None and work.secret.decode().sessions_token.startswith("sk-ant-req-")
        assert "sk-ant-req" not in repr(work)
    else:
        assert work.secret is None
    acked = await client.ack(work.id)
    assert acked.state == "starting" and acked.acknowledged_at
    first = await client.heartbeat(work.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=30)
    assert first.lease_extended and first.state == "active" and first.ttl_seconds == 30
    second = await client.heartbeat(work.id, expected_last_heartbeat=first.last_heartbeat, desired_ttl_seconds=30)
    assert second.last_heartbeat != first.last_heartbeat
    got = await client.get(work.id)
    assert got.state == "active" and got.secret is None and got.started_at
    updated = await client.update_metadata(work.id, {"a": "1", "b": "2"})
    assert updated.metadata == {"a": "1", "b": "2"}
    updated = await client.update_metadata(work.id, {"a": None})
    assert updated.metadata == {"b": "2"}
    stats = await client.stats()
    assert stats.depth == 0
    stopped = await client.stop(work.id, force=True)
    assert stopped.state == "stopped" and stopped.stopped_at


async def test_long_poll_wakes_when_an_item_arrives(emulator: Emu, make_client: ClientFactory) -> None:
    import asyncio

    _, _, admin = emulator
    client = await make_client()
    started = time.monotonic()
    poll = asyncio.ensure_future(client.poll(block_ms=999))
    await asyncio.sleep(0.1)  # let the poll reach the server: the point is that it is already waiting
    [queued] = await enqueue(admin)
    work = await poll
    assert work is not None and work.id == queued["id"]
    assert time.monotonic() - started < 0.9


async def test_iter_work_pages(emulator: Emu, make_client: ClientFactory, provider: str) -> None:
    _, _, admin = emulator
    client = await make_client(provider)
    ids = {item["id"] for item in await enqueue(admin, 7)}
    seen = [work.id async for work in client.iter_work(page_size=3)]
    assert set(seen) == ids and len(seen) == 7
    page = await client.list_page(limit=3)
    assert len(page.data) == 3 and page.next_page


async def test_unknown_fields_are_kept(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client()
    await enqueue(admin)
    work = await client.poll()
    assert work is not None
    assert work.to_json()["secret"] is None


# -- error rows --------------------------------------------------------------------------------------


async def test_412_stale_heartbeat_is_lease_lost_with_current_state(
    emulator: Emu, make_client: ClientFactory, provider: str
) -> None:
    _, _, admin = emulator
    client = await make_client(provider)
    await enqueue(admin)
    work = await client.poll()
    assert work is not None
    await client.ack(work.id)
    first = await client.heartbeat(work.id)
    await client.heartbeat(work.id, expected_last_heartbeat=first.last_heartbeat)
    with pytest.raises(LeaseLostError) as caught:
        await client.heartbeat(work.id, expected_last_heartbeat=first.last_heartbeat)
    error = caught.value
    assert error.status_code == 412 and error.request_id
    assert error.error_type == ("invalid_request_error" if provider == "anthropic" else "precondition_failed_error")
    assert error.current_state is not None and error.current_state.state == "active"
    assert error.attempts == 1, "a 412 is never retried"


async def test_400_rows(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client("qoder")
    await enqueue(admin)
    work = await client.poll()
    assert work is not None
    await client.ack(work.id)
    with pytest.raises(BadRequestError):
        await client.heartbeat(work.id, expected_last_heartbeat="not-a-timestamp")
    raw = await admin.post(
        f"/api/v1/cloud/environments/{ENV}/work/{work.id}/heartbeat",
        params={"desired_ttl_seconds": "-5"},
        headers={"authorization": f"Bearer {KEY}"},
    )
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    await admin_client(admin).set_environment(ENV, self_hosted=False)
    with pytest.raises(BadRequestError):
        await client.heartbeat(work.id)
    assert len(await requests(admin, "heartbeat")) == 3, "400s are not retried"


async def test_401_wrong_key(emulator: Emu, make_client: ClientFactory, provider: str) -> None:
    client = await make_client(provider, api_key="wrong-key")
    with pytest.raises(AuthenticationError) as caught:
        await client.stats()
    assert caught.value.status_code == 401
    assert "wrong-key" not in str(caught.value)


async def test_403_environment_key_on_management_endpoints(emulator: Emu, make_client: ClientFactory) -> None:
    emu, _, admin = emulator
    emu.update_settings(management_key=MANAGEMENT_KEY)
    [queued] = await enqueue(admin)
    client = await make_client()
    with pytest.raises(PermissionDeniedError):
        await client.get(queued["id"])
    manager = await make_client(api_key=MANAGEMENT_KEY)
    assert (await manager.get(queued["id"])).id == queued["id"]


async def test_404_unknown_item(emulator: Emu, make_client: ClientFactory, provider: str) -> None:
    client = await make_client(provider)
    with pytest.raises(NotFoundError) as caught:
        await client.get("work_0123456789abcdef0123456789abcdef")
    assert caught.value.error_type == "not_found_error"


async def test_409_rows(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    [queued] = await enqueue(admin)
    poller = await make_client("qoder", worker_id="worker-a")
    other = await make_client("qoder", worker_id="worker-b")
    work = await poller.poll()
    assert work is not None
    with pytest.raises(ConflictError):
        await poller.heartbeat(queued["id"])  # still queued: cannot be heartbeated
    with pytest.raises(ConflictError):
        await other.ack(work.id)  # polled by worker-a
    await poller.ack(work.id)
    with pytest.raises(ConflictError):
        await poller.ack(work.id)  # acked already
    assert len(await requests(admin, "ack")) == 3, "409 on ack is final, not retried"


async def test_id_validation_prevents_path_injection() -> None:
    client = WorkApiClient(provider="anthropic", api_key="k", environment_id="env_1", base_url="http://127.0.0.1:9")
    with pytest.raises(ValueError, match="work_id"):
        await client.get("../../stats")
    with pytest.raises(ValueError, match="environment_id"):
        WorkApiClient(provider="anthropic", api_key="k", environment_id="env/1")


# -- retries -----------------------------------------------------------------------------------------


async def test_503_with_retry_after_is_retried_after_it(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client()
    await fault(admin, operation="stats", status=503, count=1, retry_after="1")
    started = time.monotonic()
    stats = await client.stats()
    assert stats.depth == 0
    assert time.monotonic() - started >= 1.0
    attempts = await requests(admin, "stats")
    assert [a["status"] for a in attempts] == [503, 200]


async def test_400_is_not_retried(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client()
    await fault(admin, operation="stats", status=400, count=5)
    with pytest.raises(BadRequestError) as caught:
        await client.stats()
    assert caught.value.attempts == 1
    assert len(await requests(admin, "stats")) == 1


async def test_dropped_connection_during_poll_is_retried(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client()
    [queued] = await enqueue(admin)
    await fault(admin, operation="poll", drop=True, count=1)
    work = await client.poll(block_ms=100)
    assert work is not None and work.id == queued["id"]


async def test_retries_stop_at_their_deadline(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, deadline=1.5, max_attempts=100)
    client = await make_client(retry=RetryPolicies(default=policy, per_operation={}))
    await fault(admin, operation="stats", status=503, count=1000)
    started = time.monotonic()
    with pytest.raises(ServerError) as caught:
        await client.stats()
    elapsed = time.monotonic() - started
    assert caught.value.attempts > 1
    assert elapsed < 1.5 + 0.5, f"retries ran past the deadline: {elapsed:.2f}s"


class _StallOnRetry(logging.Handler):
    """Blocks the event loop for `stall` seconds when the client announces its `nth` retry: a stand-in for a
    busy host whose timer fires late, so the sleep before the next attempt overruns the deadline."""

    def __init__(self, nth: int, stall: float) -> None:
        super().__init__()
        self.nth, self.stall, self.seen = nth, stall, 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("work api attempt failed"):
            self.seen += 1
            if self.seen == self.nth:
                time.sleep(self.stall)  # deliberately blocking: the point is a loop that cannot keep time


async def test_a_sleep_that_overruns_the_deadline_ends_with_the_last_answer(
    emulator: Emu, make_client: ClientFactory
) -> None:
    """Guarantee: no attempt starts past the deadline, and the caller gets what the Work API last said (here 503),
    not a made-up timeout. CI once saw `RequestTimeout: its deadline passed` when a 2-core runner overslept."""
    _, _, admin = emulator
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=0.3, deadline=1.0, max_attempts=100)
    client = await make_client(retry=RetryPolicies(default=policy, per_operation={}))
    await fault(admin, operation="stats", status=503, count=1000, retry_after_ms="200")
    stall = _StallOnRetry(nth=2, stall=1.0)
    logger = logging.getLogger("sidecar.workapi")
    logger.addHandler(stall)
    try:
        with pytest.raises(ServerError) as caught:
            await client.stats()
    finally:
        logger.removeHandler(stall)
    assert stall.seen == 2
    assert caught.value.attempts == 2
    assert len(await requests(admin, "stats")) == 2


async def test_x_should_retry_false_is_final(emulator: Emu, make_client: ClientFactory) -> None:
    _, _, admin = emulator
    client = await make_client()
    await fault(admin, operation="stats", status=503, count=5, should_retry=False)
    with pytest.raises(ServerError):
        await client.stats()
    assert len(await requests(admin, "stats")) == 1


@pytest.mark.parametrize("http_backend", HTTP_BACKENDS)
async def test_unreachable_api_is_a_transport_error(http_backend: str) -> None:
    fast = RetryPolicies(default=RetryPolicy(initial_backoff=0.01, max_backoff=0.02, deadline=0.5), per_operation={})
    async with WorkApiClient(
        provider="anthropic",
        api_key="k",
        environment_id="env_1",
        base_url="http://127.0.0.1:9",
        retry=fast,
        http_backend=http_backend,
    ) as client:
        with pytest.raises(TransportError) as caught:
            await client.stats()
    assert not isinstance(caught.value, RequestTimeout), "refused is not a timeout"
    assert caught.value.attempts > 1, "connection errors are retried"


async def test_a_drop_and_a_timeout_are_told_apart(emulator: Emu, make_client: ClientFactory) -> None:
    """Whatever the transport: a dropped connection is a TransportError, a slow answer a RequestTimeout."""
    _, _, admin = emulator
    once = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=5.0), per_operation={})
    client = await make_client(retry=once, timeouts=Timeouts(read=0.3))
    # Two drops: a client library may resend an idempotent request once when a reused keep-alive connection turns
    # out closed (RFC 9112 9.3.1); POSTs (ack, heartbeat, stop) it never resends.
    await fault(admin, operation="stats", drop=True, count=2)
    with pytest.raises(TransportError) as dropped:
        await client.stats()
    assert not isinstance(dropped.value, RequestTimeout), str(dropped.value)
    await admin_client(admin).clear_faults()  # the second drop, where one was enough
    await fault(admin, operation="stats", latency_ms=1500, count=1)
    with pytest.raises(RequestTimeout):
        await client.stats()


def test_headers_per_provider() -> None:
    anthropic = WorkApiClient(provider="anthropic", api_key="k1", environment_id="env_1", worker_id="w")
    qoder = WorkApiClient(provider="qoder", api_key="k2", environment_id="env_1", worker_id="w")
    headers: Any = anthropic.headers
    assert headers["anthropic-beta"] == "managed-agents-2026-04-01" and headers["anthropic-worker-id"] == "w"
    assert qoder.headers["worker-id"] == "w" and "anthropic-version" not in qoder.headers
    assert "authorization" not in anthropic.headers and "authorization" in anthropic._headers
    assert "k1" not in repr(anthropic)


async def test_proxies_from_the_environment_are_honoured(
    emulator: Emu, make_client: ClientFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On both transports, HTTP_PROXY is used (here a dead one: the request fails) and NO_PROXY bypasses it."""
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    once = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=5.0), per_operation={})
    through_proxy = await make_client(retry=once)
    with pytest.raises(TransportError):
        await through_proxy.stats()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    direct = await make_client(retry=once)
    assert (await direct.stats()).depth == 0


@given(st.text())
def test_query_values_are_escaped_exactly_as_quote_does(value: str) -> None:
    """The client's fast escaping of query values (`_quote`) must equal `quote(value, safe="")` for any text."""
    assert _quote(value) == quote(value, safe="")
