"""Acceptance: the official `anthropic` SDK (pinned 2.10.0) runs its own Work API calls and its own poller against
the emulator, and parses the emulator's 412 as the typed error it raises for the real API."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator

import anthropic
import pytest
from anthropic.types.beta.environments import BetaHeartbeatPreconditionFailedError

from sidecar.emulator import Emulator, EmulatorSettings, EmulatorThread

KEY = "sk-ant-oat01-official-sdk-test"
ENV = "env_011CZkZ9X2dpNyB7HsEFoRfW"


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorSettings(key=KEY, min_ttl_seconds=1)) as running:
        yield running


@pytest.fixture
async def served() -> AsyncIterator[tuple[Emulator, str]]:
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
    async with emulator.serve() as url:
        yield emulator, url


def _enqueue(running: EmulatorThread, count: int = 1, data_type: str = "session") -> list[dict[str, object]]:
    """Through the in-process face, on the emulator's own loop."""
    items: list[dict[str, object]] = running.call(running.emulator.enqueue, ENV, count, data_type)
    return items


def test_sdk_worker_calls_all_succeed(emulator: EmulatorThread) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)  # sends X-Api-Key
    work_api = client.beta.environments.work
    [queued] = _enqueue(emulator)
    stats = work_api.stats(ENV)
    assert stats.type == "work_queue_stats" and stats.depth == 1 and stats.pending == 0
    assert stats.oldest_queued_at == queued["created_at"]

    work = work_api.poll(ENV, block_ms=500, anthropic_worker_id="sdk-worker")
    assert work is not None and work.id == queued["id"] and work.state == "queued"
    assert work.data.type == "session" and work.data.id == queued["data"]["id"]  # type: ignore[index]
    assert work.secret is not None
    assert work_api.stats(ENV).pending == 1 and work_api.stats(ENV).workers_polling == 1
    acked = work_api.ack(work.id, environment_id=ENV)
    assert acked.state == "starting" and acked.acknowledged_at is not None
    first = work_api.heartbeat(
        work.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=60
    )
    assert first.type == "work_heartbeat" and first.lease_extended and first.state == "active"
    assert first.ttl_seconds == 60
    second = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    assert second.last_heartbeat > first.last_heartbeat

    got = work_api.retrieve(work.id, environment_id=ENV)
    assert got.state == "active" and got.started_at is not None and got.secret is None
    updated = work_api.update(work.id, environment_id=ENV, metadata={"a": "1", "b": "2"})
    assert updated.metadata == {"a": "1", "b": "2"}
    updated = work_api.update(work.id, environment_id=ENV, metadata={"a": None})
    assert updated.metadata == {"b": "2"}
    assert work.id in [w.id for w in work_api.list(ENV, limit=10)]
    assert work_api.stats(ENV).depth == 0 and work_api.stats(ENV).pending == 0

    stopping = work_api.stop(work.id, environment_id=ENV)
    assert stopping.state == "stopping" and stopping.stop_requested_at is not None
    told = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=second.last_heartbeat)
    assert told.state == "stopping"
    stopped = work_api.stop(work.id, environment_id=ENV, force=True)
    assert stopped.state == "stopped" and stopped.stopped_at is not None
    with pytest.raises(anthropic.ConflictError):
        work_api.stop(work.id, environment_id=ENV, force=True)


def test_sdk_parses_the_412(emulator: EmulatorThread) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)
    work_api = client.beta.environments.work
    _enqueue(emulator)
    work = work_api.poll(ENV)
    assert work is not None
    work_api.ack(work.id, environment_id=ENV)
    first = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT")
    second = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    with pytest.raises(anthropic.APIStatusError) as caught:
        work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    error = caught.value
    assert isinstance(error, BetaHeartbeatPreconditionFailedError) and isinstance(
        error, anthropic.PreconditionFailedError
    )
    assert error.status_code == 412 and error.error_code == "heartbeat_precondition_failed"
    assert error.type == "invalid_request_error"
    assert error.request_id is not None and error.request_id.startswith("req_")
    details = error.details
    assert details is not None and details.error_code == "heartbeat_precondition_failed"
    current = details.current_state
    assert current.state == "active" and current.last_heartbeat == second.last_heartbeat
    assert current.lease_extended is False and current.ttl_seconds == 60


def test_sdk_retries_an_injected_503_and_sees_a_dropped_connection(emulator: EmulatorThread) -> None:
    emulator.call(emulator.emulator.inject_fault, "stats", status=503, retry_after_ms="10", count=1)
    retrying = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=2)
    assert retrying.beta.environments.work.stats(ENV).depth == 0
    statuses = [e["status"] for e in emulator.call(lambda: emulator.emulator.requests)]
    assert statuses == [503, 200]
    emulator.call(emulator.emulator.inject_fault, "poll", drop=True, count=1)
    once = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)
    with pytest.raises(anthropic.APIConnectionError):
        once.beta.environments.work.poll(ENV)


def test_sdk_heartbeats_with_the_items_sessions_token(emulator: EmulatorThread) -> None:
    """Official workers heartbeat and stop with the sessions token from the item's secret."""
    client = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)
    _enqueue(emulator)
    work = client.beta.environments.work.poll(ENV)
    assert work is not None and work.secret is not None
    client.beta.environments.work.ack(work.id, environment_id=ENV)
    payload = json.loads(base64.urlsafe_b64decode(work.secret + "=" * (-len(work.secret) % 4)))
    assert payload["api_base_url"] == emulator.url
    scoped = anthropic.Anthropic(auth_token=payload["sessions_token"], base_url=emulator.url, max_retries=0)
    beat = scoped.beta.environments.work.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT")
    assert beat.state == "active"
    with pytest.raises(anthropic.PermissionDeniedError):
        scoped.beta.environments.work.retrieve(work.id, environment_id=ENV)
    assert scoped.beta.environments.work.stop(work.id, environment_id=ENV, force=True).state == "stopped"


async def test_sdk_async_client_pages_through_list(served: tuple[Emulator, str]) -> None:
    emulator, url = served
    ids = {item["id"] for item in emulator.enqueue(ENV, 5)}
    async with anthropic.AsyncAnthropic(api_key=KEY, base_url=url, max_retries=0) as client:
        seen = [work.id async for work in client.beta.environments.work.list(ENV, limit=2)]
        assert set(seen) == ids and len(seen) == 5, "auto-pagination follows next_page"
        page = await client.beta.environments.work.list(ENV, limit=2)
        assert len(page.data) == 2 and page.next_page is not None
    assert [e["query"].get("page") is not None for e in emulator.requests if e["operation"] == "list"][:4] == [
        False,
        True,
        True,
        False,
    ]


async def test_sdk_poller_claims_and_stops(served: tuple[Emulator, str]) -> None:
    emulator, url = served
    queued = {item["id"] for item in emulator.enqueue(ENV, 3)}
    [check] = emulator.enqueue(ENV, data_type="healthcheck")
    async with anthropic.AsyncAnthropic(api_key="unused-api-key", base_url=url, max_retries=0) as client:
        seen = set()
        async for work in client.beta.environments.work.poller(
            environment_id=ENV, environment_key=KEY, drain=True, block_ms=50
        ):
            assert emulator.get_item(ENV, work.id)["state"] == "starting", "the poller yields acked items"
            seen.add(work.id)
    assert seen == queued | {check["id"]}
    for work_id in seen:
        assert emulator.get_item(ENV, work_id)["state"] == "stopped", "auto_stop stopped each item"
    polls = [e for e in emulator.requests if e["operation"] == "poll"]
    assert all(e["query"].get("block_ms") == "50" and e["worker_id"] for e in polls)
