"""Leases and their ends: expiry back to the queue (waking a waiting poll), the `starting` strand, lease theft,
the ack rules and graceful / forced stops."""

from __future__ import annotations

import time

import pytest

from tests.helpers import eventually

from .conftest import ANTHROPIC, ENV, NO_HEARTBEAT, QODER, Api, Flavour


async def _state_becomes(api: Api, work_id: str, state: str, timeout: float = 5) -> None:
    async def reached() -> bool:
        return bool((await api.view(work_id))["state"] == state)

    await eventually(reached, timeout=timeout, interval=0.02, message=f"{work_id} becomes {state}")


# -- expiry ---------------------------------------------------------------------------------------------


async def test_lease_expiry_requeues_the_item_and_wakes_a_waiting_poll(api: Api, flavour: Flavour) -> None:
    work, last = await api.claim(flavour, ttl=1)
    beat_at = time.monotonic()
    assert (await api.poll(flavour, "other", block_ms=400)).json() is None  # still leased at +0.4 s
    parked_at = time.monotonic()
    woken = await api.poll(flavour, "other", block_ms=999)  # parked when the lease runs out at +1 s
    assert woken.json() is not None and woken.json()["id"] == work["id"] and woken.json()["state"] == "queued"
    assert time.monotonic() - parked_at < 0.9, "woken by the expiry, not by its block_ms"
    assert 0.95 <= time.monotonic() - beat_at < 1.5
    view = await api.view(work["id"])
    assert view["requeues"] == 1 and view["last_heartbeat"] is None and view["acknowledged_at"] is None
    stale = await api.heartbeat(ANTHROPIC, work["id"], last)
    assert stale.status_code == 412
    assert stale.json()["error"]["details"]["current_state"] | {"ttl_seconds": 1} == {
        "state": "queued",
        "last_heartbeat": None,
        "lease_extended": False,
        "ttl_seconds": 1,
        "lease_updated_at": None,
    }


async def test_heartbeats_keep_the_lease(api: Api) -> None:
    work, last = await api.claim(QODER, ttl=1)
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:  # heartbeat every ~0.4 s for longer than the TTL
        assert (await api.poll(QODER, "other", block_ms=400)).json() is None
        beat = await api.heartbeat(QODER, work["id"], last, 1)
        assert beat.status_code == 200, "the lease held"
        last = beat.json()["last_heartbeat"]
    assert (await api.view(work["id"]))["state"] == "active"


async def test_acked_but_never_heartbeated_stays_starting(api: Api) -> None:
    await api.enqueue()
    stranded = await api.polled(ANTHROPIC, "w")
    await api.ack(ANTHROPIC, stranded["id"], "w")
    view = await api.view(stranded["id"])
    assert view["state"] == "starting" and view["lease_expires_at"] is None, "no lease, no expiry"
    witness, _ = await api.claim(ANTHROPIC, ttl=1)
    await _state_becomes(api, witness["id"], "queued")  # a 1 s lease ran out meanwhile...
    assert (await api.view(stranded["id"]))["state"] == "starting"  # ...the strand did not move


async def test_reclaiming_starting_items_is_a_setting(api: Api) -> None:
    api.emulator.update_settings(reclaim_starting_after_seconds=0.2)
    await api.enqueue()
    work = await api.polled(QODER, "w")
    await api.ack(QODER, work["id"], "w")
    await _state_becomes(api, work["id"], "queued", timeout=3)


async def test_stopping_item_whose_lease_runs_out_goes_back_to_the_queue(api: Api) -> None:
    work, _ = await api.claim(QODER, ttl=1)
    await api.stop(QODER, work["id"])
    await _state_becomes(api, work["id"], "queued", timeout=3)


async def test_stopping_expiry_to_stopped_is_a_setting(api: Api) -> None:
    api.emulator.update_settings(stopping_expiry="stopped")
    work, _ = await api.claim(QODER, ttl=1)
    await api.stop(QODER, work["id"])
    await _state_becomes(api, work["id"], "stopped", timeout=3)


async def test_admin_expire_ends_a_lease_now(api: Api, flavour: Flavour) -> None:
    work, last = await api.claim(flavour, ttl=600)
    expired = await api.http.post(f"/_emulator/environments/{ENV}/work/{work['id']}/expire")
    assert expired.status_code == 200 and expired.json()["state"] == "queued"
    assert (await api.heartbeat(flavour, work["id"], last)).status_code in (409, 412)
    assert (await api.http.post(f"/_emulator/environments/{ENV}/work/{work['id']}/expire")).status_code == 409


# -- theft ----------------------------------------------------------------------------------------------


async def test_stolen_lease_fails_the_holders_next_cas(api: Api, flavour: Flavour) -> None:
    work, last = await api.claim(flavour, ttl=30)
    stolen = await api.http.post(f"/_emulator/environments/{ENV}/work/{work['id']}/steal")
    assert stolen.status_code == 200
    thief = stolen.json()["last_heartbeat"]
    assert thief != last and stolen.json()["holder"] == "<thief>"
    refused = await api.heartbeat(flavour, work["id"], last)
    assert refused.status_code == 412
    assert refused.json()["error"]["details"]["current_state"]["last_heartbeat"] == thief
    assert (await api.heartbeat(flavour, work["id"], thief)).status_code == 200


async def test_nothing_to_steal_from_a_queued_item(api: Api) -> None:
    [item] = await api.enqueue()
    assert (await api.http.post(f"/_emulator/environments/{ENV}/work/{item['id']}/steal")).status_code == 409
    assert (await api.http.post(f"/_emulator/environments/{ENV}/work/nope/steal")).status_code == 404


# -- ack ------------------------------------------------------------------------------------------------


async def test_ack_only_a_polled_queued_item_once(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue()
    not_polled = await api.ack(flavour, item["id"], "w")
    assert not_polled.status_code == 409 and not_polled.json()["error"]["type"] == "invalid_request_error"
    await api.polled(flavour, "w")
    acked = await api.ack(flavour, item["id"], "w")
    assert acked.status_code == 200 and acked.json()["state"] == "starting"
    assert (await api.ack(flavour, item["id"], "w")).status_code == 409, "acked already"
    assert (await api.ack(flavour, "work_nope", "w")).status_code == 404
    stats = (await api.call(flavour, "GET", "/stats")).json()
    assert stats["depth"] == 0 and stats["pending"] == 0, "an acked item left the queue"


async def test_qoder_ack_must_come_from_the_polling_worker(api: Api) -> None:
    [item] = await api.enqueue()
    await api.polled(QODER, "worker-a")
    other = await api.ack(QODER, item["id"], "worker-b")
    assert other.status_code == 409 and other.json()["error"]["type"] == "invalid_request_error"
    assert (await api.ack(QODER, item["id"])).status_code == 409, "no Worker-ID is another worker"
    assert (await api.ack(QODER, item["id"], "worker-a")).status_code == 200
    [anonymous] = await api.enqueue()
    await api.polled(QODER)
    assert (await api.ack(QODER, anonymous["id"])).status_code == 200, "anonymous poll, anonymous ack"


async def test_qoder_ack_after_a_reclaim_belongs_to_the_new_poller(api: Api) -> None:
    [item] = await api.enqueue()
    await api.polled(QODER, "slow")
    await api.polled(QODER, "fast", reclaim_older_than_ms=0)
    assert (await api.ack(QODER, item["id"], "slow")).status_code == 409
    assert (await api.ack(QODER, item["id"], "fast")).status_code == 200


async def test_anthropic_ack_worker_check_is_a_setting(api: Api) -> None:
    [first, second] = await api.enqueue(2)
    await api.polled(ANTHROPIC, "worker-a")
    assert (await api.ack(ANTHROPIC, first["id"])).status_code == 200, "the SDK sends no worker id on ack"
    api.emulator.update_settings(ack_requires_polling_worker=True)
    await api.polled(ANTHROPIC, "worker-a")
    assert (await api.ack(ANTHROPIC, second["id"], "worker-b")).status_code == 409
    assert (await api.ack(ANTHROPIC, second["id"], "worker-a")).status_code == 200


# -- stop -----------------------------------------------------------------------------------------------


async def test_graceful_stop_then_a_second_stop(api: Api, flavour: Flavour) -> None:
    work, _ = await api.claim(flavour, ttl=30)
    graceful = (await api.stop(flavour, work["id"])).json()  # empty body: graceful
    assert graceful["state"] == "stopping" and graceful["stop_requested_at"] and graceful["stopped_at"] is None
    again = (await api.stop(flavour, work["id"], {"force": False})).json()
    assert again["state"] == "stopped" and again["stop_requested_at"] == graceful["stop_requested_at"]


async def test_forced_stop(api: Api, flavour: Flavour) -> None:
    work, _ = await api.claim(flavour, ttl=30)
    stopped = (await api.stop(flavour, work["id"], {"force": True})).json()
    assert stopped["state"] == "stopped" and stopped["stopped_at"] and stopped["stop_requested_at"]
    conflict = await api.stop(flavour, work["id"], {"force": True})
    assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "invalid_request_error"
    api.emulator.update_settings(stop_of_stopped_conflicts=False)
    assert (await api.stop(flavour, work["id"])).json()["state"] == "stopped"


async def test_stop_of_a_queued_item(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue()
    stopped = (await api.stop(flavour, item["id"], {})).json()
    assert stopped["state"] == "stopped"
    assert (await api.poll(flavour)).json() is None, "a stopped item is out of the queue"
    assert (await api.call(flavour, "GET", "/stats")).json()["depth"] == 0


async def test_graceful_stop_of_a_starting_item(api: Api) -> None:
    [first, second] = await api.enqueue(2)
    for item in (first, second):
        await api.polled(QODER, "w")
        await api.ack(QODER, item["id"], "w")
    assert (await api.stop(QODER, first["id"])).json()["state"] == "stopped", "no holder to tell: stopped"
    api.emulator.update_settings(graceful_stop_of_starting="stopping")
    assert (await api.stop(QODER, second["id"])).json()["state"] == "stopping"
    beat = await api.heartbeat(QODER, second["id"], NO_HEARTBEAT)
    assert beat.status_code == 200 and beat.json()["state"] == "stopping"


@pytest.mark.parametrize("body", [b'{"force": "yes"}', b'{"force": null}', b"[]", b"{not json", b'"x"'])
async def test_stop_body_validation(api: Api, flavour: Flavour, body: bytes) -> None:
    [item] = await api.enqueue()
    response = await api.call(flavour, "POST", f"/{item['id']}/stop", content=body)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert (await api.view(item["id"]))["state"] == "queued"
