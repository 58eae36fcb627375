"""Heartbeats: exact compare-and-swap, the 412 bodies per flavour, strictly increasing stamps, the TTL clamp,
and each flavour's rules for queued, stopping and stopped items."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from .conftest import ANTHROPIC, ENV, NO_HEARTBEAT, QODER, Api, Flavour


def assert_412(response: Any, flavour: Flavour, state: str, last_heartbeat: str | None) -> dict[str, Any]:
    assert response.status_code == 412
    body: dict[str, Any] = response.json()
    assert set(body) == {"type", "error", "request_id"} and body["type"] == "error"
    assert body["request_id"] == response.headers["request-id"]
    error = body["error"]
    assert set(error) == {"type", "message", "details"} and error["message"]
    assert error["type"] == ("invalid_request_error" if flavour is ANTHROPIC else "precondition_failed_error")
    details = error["details"]
    assert set(details) == {"error_code", "current_state"}
    assert details["error_code"] == "heartbeat_precondition_failed"
    current = details["current_state"]
    assert set(current) == {"state", "last_heartbeat", "lease_extended", "ttl_seconds", "lease_updated_at"}
    assert current["state"] == state and current["last_heartbeat"] == last_heartbeat
    assert current["lease_extended"] is False and isinstance(current["ttl_seconds"], int)
    return body


async def test_cas_accepts_the_exact_echo_and_refuses_anything_else(api: Api, flavour: Flavour) -> None:
    work, first = await api.claim(flavour, ttl=30)
    second = (await api.heartbeat(flavour, work["id"], first, 30)).json()["last_heartbeat"]
    stale = await api.heartbeat(flavour, work["id"], first)
    body = assert_412(stale, flavour, "active", second)
    assert body["error"]["details"]["current_state"]["ttl_seconds"] == 30
    assert body["error"]["details"]["current_state"]["lease_updated_at"] == second
    assert_412(await api.heartbeat(flavour, work["id"], NO_HEARTBEAT), flavour, "active", second)
    shifted = second.replace("Z", "+00:00")  # the same instant, other bytes: not an exact echo
    assert_412(await api.heartbeat(flavour, work["id"], shifted), flavour, "active", second)
    assert (await api.heartbeat(flavour, work["id"], second)).status_code == 200


async def test_first_heartbeat_needs_no_heartbeat_and_starts_the_item(api: Api, flavour: Flavour) -> None:
    await api.enqueue()
    work = await api.polled(flavour, "w")
    await api.ack(flavour, work["id"], "w")
    assert_412(await api.heartbeat(flavour, work["id"], "2026-01-01T00:00:00.000000Z"), flavour, "starting", None)
    first = await api.heartbeat(flavour, work["id"], NO_HEARTBEAT)
    assert first.status_code == 200 and first.json()["state"] == "active"
    assert (await api.view(work["id"]))["started_at"] == first.json()["last_heartbeat"]


async def test_last_heartbeat_strictly_increases_even_within_one_microsecond(api: Api, flavour: Flavour) -> None:
    work, last = await api.claim(flavour, ttl=30)
    seen = [last]
    for _ in range(20):  # over HTTP
        seen.append((await api.heartbeat(flavour, work["id"], seen[-1])).json()["last_heartbeat"])
    for _ in range(200):  # in process, many within the same microsecond
        seen.append(api.emulator.steal_lease(ENV, work["id"])["last_heartbeat"])
    assert seen == sorted(seen) and len(set(seen)) == len(seen)
    assert (await api.heartbeat(flavour, work["id"], seen[-1])).status_code == 200


async def test_concurrent_heartbeats_with_one_expected_value_one_wins(api: Api, flavour: Flavour) -> None:
    work, last = await api.claim(flavour, ttl=30)
    responses = await asyncio.gather(*(api.heartbeat(flavour, work["id"], last) for _ in range(10)))
    assert sorted(r.status_code for r in responses) == [200] + [412] * 9


async def test_ttl_is_clamped_validated_and_defaulted(api: Api, flavour: Flavour) -> None:
    api.emulator.update_settings(min_ttl_seconds=10, max_ttl_seconds=600, default_ttl_seconds=60)
    work, last = await api.claim(flavour, ttl=5000)
    beat = (await api.heartbeat(flavour, work["id"], last, 5000)).json()
    assert beat["ttl_seconds"] == 600
    beat = (await api.heartbeat(flavour, work["id"], beat["last_heartbeat"], 3)).json()
    assert beat["ttl_seconds"] == 10
    beat = (await api.heartbeat(flavour, work["id"], beat["last_heartbeat"])).json()
    assert beat["ttl_seconds"] == 60, "the default TTL when none is asked for"
    for bad in ("0", "-1", "1.5", "x", "", "1e3"):
        response = await api.heartbeat(flavour, work["id"], beat["last_heartbeat"], bad)
        assert response.status_code == 400, bad
        assert response.json()["error"]["type"] == "invalid_request_error"
    api.emulator.update_settings(min_ttl_seconds=1, max_ttl_seconds=2)
    assert (await api.heartbeat(flavour, work["id"], beat["last_heartbeat"], 30)).json()["ttl_seconds"] == 2


async def test_omitted_expected_value_is_an_unconditional_heartbeat(api: Api, flavour: Flavour) -> None:
    await api.enqueue()
    work = await api.polled(flavour, "w")
    await api.ack(flavour, work["id"], "w")
    claimed = await api.heartbeat(flavour, work["id"])
    assert claimed.status_code == 200 and claimed.json()["state"] == "active"
    api.emulator.steal_lease(ENV, work["id"])
    assert (await api.heartbeat(flavour, work["id"])).status_code == 200


async def test_qoder_refuses_queued_and_stopped_items_with_409(api: Api) -> None:
    [item] = await api.enqueue()
    for expected in (None, NO_HEARTBEAT):
        response = await api.heartbeat(QODER, item["id"], expected)
        assert response.status_code == 409 and response.json()["error"]["type"] == "invalid_request_error"
    work, last = await api.claim(QODER)
    await api.stop(QODER, work["id"], {"force": True})
    assert (await api.heartbeat(QODER, work["id"], last)).status_code == 409


@pytest.mark.parametrize(
    "value", ["not-a-timestamp", "2026-07-01", "2026-07-01T08:15:06", "2026-13-01T08:15:06Z", "no_heartbeat"]
)
async def test_qoder_rejects_a_malformed_expected_value(api: Api, value: str) -> None:
    work, _ = await api.claim(QODER)
    response = await api.heartbeat(QODER, work["id"], value)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


async def test_anthropic_compares_any_string_and_answers_412(api: Api) -> None:
    work, _ = await api.claim(ANTHROPIC)
    assert (await api.heartbeat(ANTHROPIC, work["id"], "not-a-timestamp")).status_code == 412


async def test_anthropic_queued_item_gets_412_with_its_queued_state(api: Api) -> None:
    [item] = await api.enqueue()
    assert_412(await api.heartbeat(ANTHROPIC, item["id"], NO_HEARTBEAT), ANTHROPIC, "queued", None)
    unconditional = await api.heartbeat(ANTHROPIC, item["id"])
    assert unconditional.status_code == 409, "a queued item cannot be claimed by heartbeat"


async def test_anthropic_does_not_compare_while_stopping_or_stopped(api: Api) -> None:
    work, last = await api.claim(ANTHROPIC, ttl=30)
    await api.stop(ANTHROPIC, work["id"])
    stopping = await api.heartbeat(ANTHROPIC, work["id"], "anything at all")
    assert stopping.status_code == 200
    assert stopping.json()["state"] == "stopping" and stopping.json()["lease_extended"] is True
    await api.stop(ANTHROPIC, work["id"], {"force": True})
    stopped = await api.heartbeat(ANTHROPIC, work["id"], last)
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped" and stopped.json()["lease_extended"] is False
    assert stopped.json()["last_heartbeat"] == stopping.json()["last_heartbeat"]


async def test_anthropic_compare_while_stopping_is_a_setting(api: Api) -> None:
    api.emulator.update_settings(anthropic_compare_while_stopping=True)
    work, last = await api.claim(ANTHROPIC, ttl=30)
    await api.stop(ANTHROPIC, work["id"])
    assert_412(await api.heartbeat(ANTHROPIC, work["id"], "stale"), ANTHROPIC, "stopping", last)
    assert (await api.heartbeat(ANTHROPIC, work["id"], last)).json()["state"] == "stopping"


async def test_qoder_compares_while_stopping(api: Api) -> None:
    work, last = await api.claim(QODER, ttl=30)
    await api.stop(QODER, work["id"])
    assert_412(await api.heartbeat(QODER, work["id"], NO_HEARTBEAT), QODER, "stopping", last)
    assert (await api.heartbeat(QODER, work["id"], last)).json()["state"] == "stopping"


async def test_heartbeat_of_an_unknown_item_is_404(api: Api, flavour: Flavour) -> None:
    response = await api.heartbeat(flavour, "work_nope", NO_HEARTBEAT)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
