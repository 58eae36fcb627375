"""Credentials, the error envelope, request ids, and every row of Qoder's heartbeat error table."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from .conftest import ANTHROPIC, ENV, KEY, MANAGEMENT_KEY, NO_HEARTBEAT, QODER, Api, Flavour, decode_secret


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["type"] == "error" and set(body) == {"type", "error", "request_id"}
    assert body["error"]["type"] == error_type and body["error"]["message"]
    assert body["request_id"] == response.headers["request-id"]
    return body


# -- credentials ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"authorization": None}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {KEY}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_401(api: Api, flavour: Flavour, headers: dict[str, str | None]) -> None:
    response = await api.call(flavour, "GET", "/stats", headers=headers)
    body = assert_error(response, 401, "authentication_error")
    assert KEY not in response.text and "wrong" not in body["error"]["message"]


async def test_x_api_key_is_anthropic_only(api: Api) -> None:
    ok = await api.call(ANTHROPIC, "GET", "/stats", headers={"authorization": None, "x-api-key": KEY})
    assert ok.status_code == 200
    refused = await api.call(QODER, "GET", "/stats", headers={"authorization": None, "x-api-key": KEY})
    assert_error(refused, 401, "authentication_error")


async def test_management_key_splits_the_endpoints(api: Api, flavour: Flavour) -> None:
    api.emulator.update_settings(management_key=MANAGEMENT_KEY)
    manager = {"authorization": f"Bearer {MANAGEMENT_KEY}"}
    [item] = await api.enqueue()
    path = f"/{item['id']}"
    assert_error(await api.call(flavour, "GET", path), 403, "permission_error")
    assert_error(await api.call(flavour, "POST", path, json={"metadata": {}}), 403, "permission_error")
    assert (await api.call(flavour, "GET", path, headers=manager)).status_code == 200
    assert (await api.call(flavour, "POST", path, json={"metadata": {"a": "b"}}, headers=manager)).status_code == 200
    for method, suffix in (("GET", "/poll"), ("GET", ""), ("POST", f"{path}/ack"), ("POST", f"{path}/heartbeat")):
        assert_error(await api.call(flavour, method, suffix, headers=manager), 403, "permission_error")
    assert (await api.call(flavour, "GET", "/stats", headers=manager)).status_code == 200
    assert (await api.call(flavour, "GET", "/stats")).status_code == 200, "stats takes either key"
    assert_error(
        await api.call(flavour, "GET", "/stats", headers={"authorization": "Bearer x"}), 401, "authentication_error"
    )


async def test_item_secret_authorizes_that_items_heartbeat_and_stop_only(api: Api) -> None:
    [item, other] = await api.enqueue(2)
    work = await api.polled(ANTHROPIC, "w")
    await api.ack(ANTHROPIC, work["id"], "w")
    token = {"authorization": f"Bearer {decode_secret(work['secret'])['sessions_token']}"}
    assert (await api.heartbeat(ANTHROPIC, work["id"], NO_HEARTBEAT, headers=token)).status_code == 200
    assert_error(await api.call(ANTHROPIC, "GET", f"/{work['id']}", headers=token), 403, "permission_error")
    assert_error(await api.call(ANTHROPIC, "GET", "/poll", headers=token), 403, "permission_error")
    assert_error(await api.heartbeat(ANTHROPIC, other["id"], headers=token), 403, "permission_error")
    assert_error(await api.call(QODER, "GET", "/stats", headers=token), 401, "authentication_error")
    assert (await api.stop(ANTHROPIC, work["id"], {"force": True}, headers=token)).json()["state"] == "stopped"
    api.emulator.update_settings(accept_item_token=False)
    assert_error(await api.heartbeat(ANTHROPIC, work["id"], headers=token), 401, "authentication_error")
    assert item["id"] == work["id"]


@pytest.mark.parametrize("missing", ["anthropic-version", "anthropic-beta"])
async def test_anthropic_headers_are_required(api: Api, missing: str) -> None:
    assert_error(await api.call(ANTHROPIC, "GET", "/stats", headers={missing: None}), 400, "invalid_request_error")
    other_beta = {"anthropic-beta": "files-api-2025-04-14"}
    assert_error(await api.call(ANTHROPIC, "GET", "/stats", headers=other_beta), 400, "invalid_request_error")
    several = {"anthropic-beta": "files-api-2025-04-14, managed-agents-2026-04-01"}
    assert (await api.call(ANTHROPIC, "GET", "/stats", headers=several)).status_code == 200
    api.emulator.update_settings(require_anthropic_headers=False)
    assert (await api.call(ANTHROPIC, "GET", "/stats", headers={missing: None})).status_code == 200


# -- the Qoder heartbeat error table, row by row --------------------------------------------------------


async def test_qoder_heartbeat_error_table(api: Api) -> None:
    work, last = await api.claim(QODER, ttl=30)
    work_id = work["id"]
    rows = []
    # 400: desired_ttl_seconds is not a positive integer
    rows.append((await api.heartbeat(QODER, work_id, last, "0"), 400, "invalid_request_error"))
    # 400: expected_last_heartbeat is neither NO_HEARTBEAT nor an RFC 3339 timestamp
    rows.append((await api.heartbeat(QODER, work_id, "yesterday"), 400, "invalid_request_error"))
    # 401: PAT invalid or expired
    rows.append(
        (
            await api.heartbeat(QODER, work_id, last, headers={"authorization": "Bearer expired"}),
            401,
            "authentication_error",
        )
    )
    # 403: not authorized for this operation (a key without access to the environment)
    api.emulator.set_environment(ENV, permitted=False)
    rows.append((await api.heartbeat(QODER, work_id, last), 403, "permission_error"))
    api.emulator.set_environment(ENV, permitted=True)
    # 404: environment or work item not found
    rows.append((await api.heartbeat(QODER, "work_0123456789abcdef0123456789abcdef", last), 404, "not_found_error"))
    api.emulator.update_settings(auto_create_environments=False)
    rows.append((await api.heartbeat(QODER, work_id, last, environment_id="env_unknown"), 404, "not_found_error"))
    api.emulator.update_settings(auto_create_environments=True)
    # 412: expected_last_heartbeat does not match the current lease owner
    rows.append((await api.heartbeat(QODER, work_id, NO_HEARTBEAT), 412, "precondition_failed_error"))
    # 409: the work item is queued or stopped
    [queued] = await api.enqueue()
    rows.append((await api.heartbeat(QODER, queued["id"], NO_HEARTBEAT), 409, "invalid_request_error"))
    await api.stop(QODER, work_id, {"force": True})
    rows.append((await api.heartbeat(QODER, work_id, last), 409, "invalid_request_error"))
    # 400: the environment is not self_hosted (set through the admin API)
    (await api.http.put(f"/_emulator/environments/{ENV}", json={"self_hosted": False})).raise_for_status()
    rows.append((await api.heartbeat(QODER, queued["id"], NO_HEARTBEAT), 400, "invalid_request_error"))
    for response, status, error_type in rows:
        assert_error(response, status, error_type)
    assert "self_hosted" in rows[-1][0].json()["error"]["message"]


async def test_not_self_hosted_applies_to_every_operation(api: Api, flavour: Flavour) -> None:
    api.emulator.set_environment(ENV, self_hosted=False)
    for method, suffix in (("GET", "/poll"), ("GET", "/stats"), ("GET", ""), ("POST", "/work_x/ack")):
        assert_error(await api.call(flavour, method, suffix), 400, "invalid_request_error")


# -- the envelope and request ids -----------------------------------------------------------------------


async def test_request_id_on_every_response(api: Api, flavour: Flavour) -> None:
    [item] = await api.enqueue()
    responses = [
        await api.call(flavour, "GET", "/stats"),
        await api.poll(flavour, block_ms=1),
        await api.call(flavour, "GET", "/nope/extra/path"),
        await api.call(flavour, "DELETE", f"/{item['id']}"),
        await api.call(flavour, "GET", "/stats", headers={"authorization": None}),
        await api.http.get("/v2/unknown"),
        await api.http.get("/_emulator/stats"),
        await api.http.get("/_emulator/nope"),
        await api.http.post("/_emulator/faults", json={}),
    ]
    ids = [r.headers["request-id"] for r in responses]
    assert all(rid.startswith("req_") for rid in ids) and len(set(ids)) == len(ids)
    for response in responses:
        if response.status_code >= 400:
            assert response.json()["request_id"] == response.headers["request-id"]


async def test_qoder_takes_the_request_id_from_x_request_id(api: Api) -> None:
    mine = await api.call(QODER, "GET", "/stats", headers={"x-request-id": "trace-42"})
    assert mine.headers["request-id"] == "trace-42" and mine.headers["x-request-id"] == "trace-42"
    error = await api.call(QODER, "GET", "/stats", headers={"x-request-id": "trace-43", "authorization": "Bearer no"})
    assert error.json()["request_id"] == "trace-43"
    anthropic = await api.call(ANTHROPIC, "GET", "/stats", headers={"x-request-id": "trace-44"})
    assert anthropic.headers["request-id"].startswith("req_"), "Anthropic makes its own"


async def test_unknown_paths_and_methods(api: Api, flavour: Flavour) -> None:
    assert_error(await api.call(flavour, "GET", "/work_1/nope"), 404, "not_found_error")
    assert_error(await api.call(flavour, "GET", "/work_1/ack"), 405, "invalid_request_error")
    assert_error(await api.call(flavour, "POST", "/poll"), 405, "invalid_request_error")
    assert_error(await api.call(flavour, "PUT", ""), 405, "invalid_request_error")
    assert_error(await api.call(flavour, "GET", "/work_nope"), 404, "not_found_error")
