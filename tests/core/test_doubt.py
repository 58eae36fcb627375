"""The rule that settles a refusal after an unknown outcome (`sidecar.core._doubt`), against the real emulator.

A refusal with `details.current_state` is read from it (the exact CAS value); one without is read by a GET, whose
`latest_heartbeat_at` is adopted but marked inexact (the lease stays doubtful), and a later refusal naming the
same instant is then ours. A state that shows the lease is not ours (queued, stopped) is a lost lease; a read
that fails leaves the doubt.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from sidecar.core._doubt import settle
from sidecar.workapi import NO_HEARTBEAT, ConflictError, LeaseLostError, WorkApiClient, WorkApiError

from .conftest import KEY, Api


@pytest.fixture
async def client(api: Api) -> AsyncIterator[WorkApiClient]:
    async with WorkApiClient(
        provider="anthropic", api_key=KEY, environment_id=api.environment_id, base_url=api.url
    ) as c:
        yield c


async def _held(api: Api, client: WorkApiClient) -> tuple[str, str]:
    """An item claimed by `client`: (work id, its last_heartbeat)."""
    await api.enqueue(1)
    work = await client.poll()
    assert work is not None
    await client.ack(work.id)
    beat = await client.heartbeat(work.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=30)
    return work.id, beat.last_heartbeat


async def _refusal(client: WorkApiClient, work_id: str, echoed: str) -> WorkApiError:
    try:
        await client.heartbeat(work_id, expected_last_heartbeat=echoed, desired_ttl_seconds=30)
    except WorkApiError as exc:
        return exc
    raise AssertionError("the heartbeat was not refused")


async def test_a_412_is_read_from_its_current_state(api: Api, client: WorkApiClient) -> None:
    work_id, first = await _held(api, client)
    landed = await client.heartbeat(work_id, expected_last_heartbeat=first, desired_ttl_seconds=30)  # "lost"
    refusal = await _refusal(client, work_id, first)
    assert isinstance(refusal, LeaseLostError)
    settled = await settle(client, work_id, refusal, echoed=first)
    assert settled.result is not None and settled.exact
    assert settled.result.last_heartbeat == landed.last_heartbeat and settled.result.ttl_seconds == 30
    assert not await api.requests("get", work_id), "no GET: the 412 said it all"


async def test_a_refusal_without_a_state_is_read_by_a_get_and_is_inexact(api: Api, client: WorkApiClient) -> None:
    work_id, first = await _held(api, client)
    landed = await client.heartbeat(work_id, expected_last_heartbeat=first, desired_ttl_seconds=30)
    await api.fault("heartbeat", status=409, count=1)  # a refusal with no current_state
    refusal = await _refusal(client, work_id, first)
    assert isinstance(refusal, ConflictError)
    settled = await settle(client, work_id, refusal, echoed=first)
    assert settled.result is not None and not settled.exact, "a GET's timestamp is not taken for the CAS value"
    assert settled.result.last_heartbeat == (await api.item(work_id))["latest_heartbeat_at"]
    assert settled.result.state == "active"
    # The next renewal with the value read is refused only if the GET's format differs; a 412 naming the same
    # instant is then the same heartbeat: ours.
    refusal = await _refusal(client, work_id, first)
    reformatted = landed.last_heartbeat.replace("Z", "+00:00")
    again = await settle(client, work_id, refusal, echoed=reformatted, echoed_exact=False)
    assert again.result is not None and again.exact and again.result.last_heartbeat == landed.last_heartbeat


async def test_an_unmoved_heartbeat_is_not_ours(api: Api, client: WorkApiClient) -> None:
    """A refusal while the item still shows the value we echoed (an invented refusal, or one for another reason)
    is not the work of our own heartbeat."""
    work_id, first = await _held(api, client)
    await api.fault("heartbeat", status=409, count=1)
    refusal = await _refusal(client, work_id, first)
    settled = await settle(client, work_id, refusal, echoed=first)
    assert settled.result is None and settled.state == "active" and not settled.unreadable


@pytest.mark.parametrize("how", ["requeued", "stopped"])
async def test_an_item_that_is_not_held_is_lost(api: Api, client: WorkApiClient, how: str) -> None:
    work_id, first = await _held(api, client)
    await client.heartbeat(work_id, expected_last_heartbeat=first, desired_ttl_seconds=30)
    if how == "requeued":
        await api.admin.expire_lease(api.environment_id, work_id)
    else:
        await api.platform_stop(work_id, force=True)
    await api.fault("heartbeat", status=409, count=1)
    refusal = await _refusal(client, work_id, first)
    settled = await settle(client, work_id, refusal, echoed=first)
    assert settled.result is None and settled.state == {"requeued": "queued", "stopped": "stopped"}[how]


async def test_a_read_that_fails_leaves_the_doubt(api: Api, client: WorkApiClient) -> None:
    work_id, first = await _held(api, client)
    await api.fault("heartbeat", status=409, count=1)
    await api.fault("get", status=403, count=None)
    refusal = await _refusal(client, work_id, first)
    settled = await settle(client, work_id, refusal, echoed=first)
    assert settled.unreadable and settled.result is None
