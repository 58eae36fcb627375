"""Acceptance: the official `anthropic` SDK (pinned 2.10.0) runs its own worker calls against the
emulator, and parses the emulator's 412 the way it parses the real API's."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import httpx
import pytest

from sidecar.emulator import EmulatorSettings, EmulatorThread

KEY = "sk-ant-oat01-official-sdk-test"
ENV = "env_011CZkZ9X2dpNyB7HsEFoRfW"


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread(EmulatorSettings(key=KEY)) as running:
        yield running


def _enqueue(url: str, count: int = 1) -> list[dict[str, object]]:
    response = httpx.post(f"{url}/_emulator/environments/{ENV}/work", json={"count": count})
    response.raise_for_status()
    items: list[dict[str, object]] = response.json()["data"]
    return items


def test_sdk_worker_calls_all_succeed(emulator: EmulatorThread) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)
    work_api = client.beta.environments.work
    [queued] = _enqueue(emulator.url)
    assert work_api.stats(ENV).depth == 1

    work = work_api.poll(ENV, block_ms=500, anthropic_worker_id="sdk-worker")
    assert work is not None and work.id == queued["id"] and work.state == "queued"
    assert work.data.type == "session"
    acked = work_api.ack(work.id, environment_id=ENV)
    assert acked.state == "starting"
    first = work_api.heartbeat(
        work.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=60
    )
    assert first.lease_extended and first.state == "active" and first.ttl_seconds == 60
    second = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    assert second.last_heartbeat != first.last_heartbeat

    got = work_api.retrieve(work.id, environment_id=ENV)
    assert got.state == "active" and got.started_at is not None
    updated = work_api.update(work.id, environment_id=ENV, metadata={"a": "1"})
    assert updated.metadata == {"a": "1"}
    listed = [w.id for w in work_api.list(ENV, limit=10)]
    assert work.id in listed
    stats = work_api.stats(ENV)
    assert stats.depth == 0

    stopped = work_api.stop(work.id, environment_id=ENV, force=True)
    assert stopped.state == "stopped" and stopped.stopped_at is not None


def test_sdk_parses_the_412(emulator: EmulatorThread) -> None:
    client = anthropic.Anthropic(api_key=KEY, base_url=emulator.url, max_retries=0)
    work_api = client.beta.environments.work
    _enqueue(emulator.url)
    work = work_api.poll(ENV)
    assert work is not None
    work_api.ack(work.id, environment_id=ENV)
    first = work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat="NO_HEARTBEAT")
    work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    with pytest.raises(anthropic.APIStatusError) as caught:
        work_api.heartbeat(work.id, environment_id=ENV, expected_last_heartbeat=first.last_heartbeat)
    error = caught.value
    assert error.status_code == 412
    assert type(error).__name__ == "BetaHeartbeatPreconditionFailedError", "the SDK's own 412 type"
    body = error.body
    assert isinstance(body, dict)
    assert body["error"]["details"]["error_code"] == "heartbeat_precondition_failed"
    assert body["error"]["details"]["current_state"]["state"] == "active"
    assert error.request_id and error.request_id.startswith("req_")


async def test_sdk_poller_claims_and_stops(emulator: EmulatorThread) -> None:
    client = anthropic.AsyncAnthropic(api_key="unused-api-key", base_url=emulator.url, max_retries=0)
    queued = {item["id"] for item in _enqueue(emulator.url, 3)}
    seen = set()
    sync = anthropic.Anthropic(api_key=KEY, base_url=emulator.url)
    async for work in client.beta.environments.work.poller(environment_id=ENV, environment_key=KEY, drain=True):
        current = sync.beta.environments.work.retrieve(work.id, environment_id=ENV)
        assert current.state == "starting", "the poller yields acked items"
        seen.add(work.id)
    assert seen == queued
    for work_id in queued:
        assert sync.beta.environments.work.retrieve(work_id, environment_id=ENV).state == "stopped"
