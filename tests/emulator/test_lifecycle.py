"""The whole life of a work item in both flavours, the work object's shape, secrets, metadata, list and stats."""

from __future__ import annotations

import re
from typing import Any

from .conftest import ANTHROPIC, ENV, NO_HEARTBEAT, QODER, WORK_FIELDS, Api, Flavour, decode_secret

RFC3339_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


async def test_full_lifecycle(api: Api, flavour: Flavour) -> None:
    [queued] = await api.enqueue(metadata={"origin": "test"})
    assert set(queued) == WORK_FIELDS and queued["state"] == "queued" and queued["environment_id"] == ENV
    assert queued["metadata"] == {"origin": "test"} and RFC3339_MICROS.match(queued["created_at"])

    work = await api.polled(flavour, "worker-1", block_ms=100)
    assert work["id"] == queued["id"] and work["state"] == "queued"

    acked = (await api.ack(flavour, work["id"], "worker-1")).json()
    assert acked["state"] == "starting" and RFC3339_MICROS.match(acked["acknowledged_at"])
    assert acked["secret"] is None

    first = (await api.heartbeat(flavour, work["id"], NO_HEARTBEAT, 30)).json()
    assert first["type"] == "work_heartbeat" and list(first) == [
        "type",
        "last_heartbeat",
        "lease_extended",
        "state",
        "ttl_seconds",
    ]
    assert first["lease_extended"] is True and first["state"] == "active" and first["ttl_seconds"] == 30
    assert RFC3339_MICROS.match(first["last_heartbeat"])
    second = (await api.heartbeat(flavour, work["id"], first["last_heartbeat"], 30)).json()
    assert second["last_heartbeat"] > first["last_heartbeat"]

    got = (await api.call(flavour, "GET", f"/{work['id']}")).json()
    assert got["state"] == "active" and got["secret"] is None
    assert got["started_at"] == first["last_heartbeat"] and got["latest_heartbeat_at"] == second["last_heartbeat"]

    stopping = (await api.stop(flavour, work["id"], {"force": False})).json()
    assert stopping["state"] == "stopping" and stopping["stop_requested_at"] and stopping["stopped_at"] is None
    told = (await api.heartbeat(flavour, work["id"], second["last_heartbeat"])).json()
    assert told["state"] == "stopping" and told["lease_extended"] is True
    stopped = (await api.stop(flavour, work["id"], {"force": True})).json()
    assert stopped["state"] == "stopped" and RFC3339_MICROS.match(stopped["stopped_at"])
    assert set(stopped) == WORK_FIELDS


async def test_both_flavours_share_one_store(api: Api) -> None:
    [queued] = await api.enqueue()
    work = await api.polled(QODER, "q-worker")
    assert work["id"] == queued["id"]
    await api.ack(QODER, work["id"], "q-worker")
    got = (await api.call(ANTHROPIC, "GET", f"/{work['id']}")).json()
    assert got["state"] == "starting"


async def test_secret_only_on_anthropic_polls_and_decodes_with_and_without_padding(api: Api) -> None:
    await api.enqueue(4)
    secrets_seen = []
    for _ in range(4):
        work = await api.polled(ANTHROPIC)
        assert work["secret"], "a polled Anthropic item carries a secret"
        secrets_seen.append(work["secret"])
        payload = decode_secret(work["secret"])
        assert set(payload) == {"sessions_token", "api_base_url"}
        assert payload["sessions_token"].startswith("sk-ant-req-") and payload["api_base_url"] == api.url
        assert re.fullmatch(r"[A-Za-z0-9_-]+=*", work["secret"]), "URL-safe base64"
        got = (await api.call(ANTHROPIC, "GET", f"/{work['id']}")).json()
        assert got["secret"] is None, "get never shows the secret"
    assert any(s.endswith("=") for s in secrets_seen), "some secrets keep their padding"
    assert any(len(s) % 4 for s in secrets_seen), "some secrets have it stripped"
    await api.enqueue()
    assert (await api.polled(QODER))["secret"] is None


async def test_secret_never_in_the_admin_views_or_the_request_log(api: Api) -> None:
    await api.enqueue()
    work = await api.polled(ANTHROPIC)
    view = await api.view(work["id"])
    assert "secret" not in view and view["has_secret"] is True
    everything = (await api.http.get("/_emulator/requests")).text + str(api.emulator.requests)
    assert work["secret"] not in everything and decode_secret(work["secret"])["sessions_token"] not in everything


async def test_healthcheck_items(api: Api, flavour: Flavour) -> None:
    [check] = await api.enqueue(data_type="healthcheck")
    assert check["data"]["type"] == "healthcheck"
    work = await api.polled(flavour)
    assert work["data"] == check["data"]
    assert (await api.ack(flavour, work["id"])).status_code == 200
    stopped = (await api.stop(flavour, work["id"], {"force": True})).json()
    assert stopped["state"] == "stopped"


async def test_ids_in_each_style(api: Api) -> None:
    [item] = await api.enqueue()
    assert re.fullmatch(r"work_011C[1-9A-HJ-NP-Za-km-z]{20}", item["id"])
    assert re.fullmatch(r"sesn_011C[1-9A-HJ-NP-Za-km-z]{20}", item["data"]["id"])
    api.emulator.update_settings(id_style="qoder")
    [item] = await api.enqueue()
    assert re.fullmatch(r"work_[0-9a-f]{32}", item["id"]) and re.fullmatch(r"sess_[0-9a-f]{32}", item["data"]["id"])


async def test_update_merges_and_deletes(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue(metadata={"keep": "1", "gone": "2"})
    path = f"/{item['id']}"
    merged = (await api.call(flavour, "POST", path, json={"metadata": {"new": "3", "gone": None}})).json()
    assert merged["metadata"] == {"keep": "1", "new": "3"}
    unchanged = await api.call(flavour, "POST", path, json={})
    assert unchanged.status_code == 200 and unchanged.json()["metadata"] == {"keep": "1", "new": "3"}
    for bad in ({"metadata": {"n": 1}}, {"metadata": ["x"]}, {"metadata": {"": "x"}}, ["metadata"]):
        response = await api.call(flavour, "POST", path, json=bad)
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    assert (await api.call(flavour, "POST", path, content=b"{not json")).status_code == 400
    assert (await api.call(flavour, "POST", path)).status_code == 400, "a body is required"
    assert (await api.call(flavour, "GET", path)).json()["metadata"] == {"keep": "1", "new": "3"}


async def test_stats(api: Api, flavour: Flavour) -> None:
    empty = (await api.call(flavour, "GET", "/stats")).json()
    assert empty == {
        "type": "work_queue_stats",
        "depth": 0,
        "pending": 0,
        "oldest_queued_at": None,
        "workers_polling": 0,
    }
    items = await api.enqueue(3)
    await api.polled(flavour, "w1")
    await api.polled(flavour, "w2")
    await api.poll(flavour)  # no worker id: not counted in workers_polling
    stats = (await api.call(flavour, "GET", "/stats")).json()
    assert stats["depth"] == 0 and stats["pending"] == 3 and stats["workers_polling"] == 2
    assert stats["oldest_queued_at"] == items[0]["created_at"]
    await api.ack(flavour, items[0]["id"], "w1")
    stats = (await api.call(flavour, "GET", "/stats")).json()
    assert stats["pending"] == 2 and stats["oldest_queued_at"] == items[1]["created_at"]
    api.emulator.update_settings(workers_polling_window_seconds=0.001)
    assert (await api.call(flavour, "GET", "/stats")).json()["workers_polling"] == 0


async def _pages(api: Api, flavour: Flavour, limit: int, **params: Any) -> list[list[str]]:
    pages, page = [], None
    while True:
        query = {"limit": limit, **params} | ({"page": page} if page else {})
        body = (await api.call(flavour, "GET", "", params=query)).json()
        pages.append([w["id"] for w in body["data"]])
        page = body["next_page"]
        if page is None:
            return pages


async def test_list_pages_with_the_opaque_cursor(api: Api, flavour: Flavour) -> None:
    ids = [item["id"] for item in await api.enqueue(7)]
    pages = await _pages(api, flavour, 3)
    assert pages == [ids[::-1][0:3], ids[::-1][3:6], ids[::-1][6:7]], "newest first, no gaps, no repeats"
    await api.enqueue(2)  # new items do not shift a cursor
    body = (await api.call(flavour, "GET", "", params={"limit": 3})).json()
    later = (await api.call(flavour, "GET", "", params={"limit": 3, "page": body["next_page"]})).json()
    assert [w["id"] for w in later["data"]] == ids[::-1][1:4]
    default = (await api.call(flavour, "GET", "")).json()
    assert len(default["data"]) == 9 and default["next_page"] is None
    api.emulator.update_settings(list_order="oldest_first")
    assert (await _pages(api, flavour, 5))[0] == ids[:5]


async def test_list_limits_and_bad_cursors(api: Api) -> None:
    assert (await api.call(ANTHROPIC, "GET", "", params={"limit": 1000})).status_code == 200
    assert (await api.call(ANTHROPIC, "GET", "", params={"limit": 1001})).status_code == 400
    assert (await api.call(QODER, "GET", "", params={"limit": 100})).status_code == 200
    assert (await api.call(QODER, "GET", "", params={"limit": 101})).status_code == 400
    for flavour in (ANTHROPIC, QODER):
        assert (await api.call(flavour, "GET", "", params={"limit": 0})).status_code == 400
        assert (await api.call(flavour, "GET", "", params={"limit": "x"})).status_code == 400
        assert (await api.call(flavour, "GET", "", params={"page": "garbage!"})).status_code == 400


async def test_qoder_list_after_and_before_id(api: Api) -> None:
    ids = [item["id"] for item in await api.enqueue(6)][::-1]  # newest first, as listed
    first = (await api.call(QODER, "GET", "", params={"limit": 2})).json()
    assert [w["id"] for w in first["data"]] == ids[0:2]
    assert first["first_id"] == ids[0] and first["last_id"] == ids[1] and first["has_more"] is True
    after = (await api.call(QODER, "GET", "", params={"limit": 2, "after_id": first["last_id"]})).json()
    assert [w["id"] for w in after["data"]] == ids[2:4] and after["has_more"] is True
    last = (await api.call(QODER, "GET", "", params={"limit": 5, "after_id": ids[3]})).json()
    assert [w["id"] for w in last["data"]] == ids[4:6] and last["has_more"] is False and last["next_page"] is None
    before = (await api.call(QODER, "GET", "", params={"limit": 2, "before_id": ids[4]})).json()
    assert [w["id"] for w in before["data"]] == ids[2:4] and before["has_more"] is True
    edge = (await api.call(QODER, "GET", "", params={"limit": 5, "before_id": ids[1]})).json()
    assert [w["id"] for w in edge["data"]] == ids[0:1] and edge["has_more"] is False
    empty = (await api.call(QODER, "GET", "", params={"after_id": ids[5]})).json()
    assert empty["data"] == [] and empty["first_id"] is None and empty["last_id"] is None
    assert (await api.call(QODER, "GET", "", params={"after_id": "work_unknown"})).status_code == 400
    both = await api.call(QODER, "GET", "", params={"after_id": ids[0], "page": first["next_page"]})
    assert both.status_code == 400
    anthropic = (await api.call(ANTHROPIC, "GET", "", params={"limit": 2})).json()
    assert set(anthropic) == {"data", "next_page"}, "Anthropic pages carry no first_id/last_id/has_more"
