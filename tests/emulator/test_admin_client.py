"""`AdminClient`: every admin path through the package's client, against a served emulator."""

from __future__ import annotations

import pytest

from sidecar.emulator import AdminClient, ApiError

from .conftest import ENV, NO_HEARTBEAT, QODER, Api


async def test_every_admin_call(api: Api) -> None:
    admin = AdminClient(api.url)
    async with admin:
        [item] = await admin.enqueue(ENV, 1, "session", {"origin": "test"})
        assert item["metadata"] == {"origin": "test"} and item["state"] == "queued"
        assert [view["id"] for view in await admin.items(ENV)] == [item["id"]]
        assert (await admin.environment(ENV))["states"] == {"queued": 1}

        work = await api.polled(QODER, "w1")
        assert (await api.ack(QODER, work["id"], "w1")).status_code == 200
        assert (await api.heartbeat(QODER, work["id"], NO_HEARTBEAT, 30)).status_code == 200
        view = await admin.get_item(ENV, item["id"])
        assert view["state"] == "active" and view["heartbeats"] == 1 and "secret" not in view
        assert (await admin.steal_lease(ENV, item["id"]))["holder"] == "<thief>"
        assert (await admin.expire_lease(ENV, item["id"]))["state"] == "queued"

        log = await admin.request_log()
        assert [entry["operation"] for entry in log.data] == ["poll", "ack", "heartbeat"]
        assert await admin.next_seq() == log.next == 3
        assert [entry["seq"] for entry in await admin.requests("ack")] == [1]
        assert [entry["operation"] for entry in (await admin.request_log(2)).data] == ["heartbeat"]
        assert (await admin.stats())["requests"]["heartbeat"] == {"200": 1}
        assert (await admin.clear_request_counts())["total"] == 0
        await admin.clear_requests()
        assert await admin.requests() == []

        fault = await admin.inject_fault("stats", status=503, count=None)
        assert [f["id"] for f in await admin.faults()] == [fault["id"]]
        assert (await api.call(QODER, "GET", "/stats")).status_code == 503
        await admin.remove_fault(fault["id"])
        await admin.inject_fault("*", latency_ms=1)
        await admin.clear_faults()
        assert await admin.faults() == []

        changed = await admin.update_settings(default_ttl_seconds=42)
        assert changed["default_ttl_seconds"] == 42 == (await admin.settings())["default_ttl_seconds"]
        assert (await admin.settings())["key"] == "<redacted>"

        off = await admin.set_environment(ENV, self_hosted=False)
        assert off["self_hosted"] is False and off["permitted"] is True
        assert (await api.call(QODER, "GET", "/stats")).status_code == 400

        await admin.reset()
        with pytest.raises(ApiError) as unknown:
            await admin.items(ENV)
        assert unknown.value.status == 404 and unknown.value.error_type == "not_found_error"


async def test_errors_carry_the_envelope(api: Api) -> None:
    async with AdminClient(api.url) as admin:
        with pytest.raises(ApiError) as bad:
            await admin.enqueue(ENV, 0)
        assert bad.value.status == 400 and "count" in bad.value.message
        with pytest.raises(ApiError) as read_only:
            await admin.update_settings(key="other")
        assert read_only.value.status == 400 and "read-only" in read_only.value.message
        with pytest.raises(ApiError) as no_fault:
            await admin.remove_fault(10**9)
        assert no_fault.value.status == 404
