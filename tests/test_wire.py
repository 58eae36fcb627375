"""The wire module is the one owner of the Work API's wire facts: a third provider needs a profile and an emulator
flavour, and nothing else; no other module branches on a provider's name; both sides shape work objects alike."""

from __future__ import annotations

import ast
from pathlib import Path
from types import MappingProxyType

import httpx
import pytest

from sidecar import wire
from sidecar.emulator import FLAVOURS, AdminClient, Emulator, EmulatorSettings, Flavour
from sidecar.workapi import LeaseLostError, RetryPolicies, RetryPolicy, Work, WorkApiClient, WorkPage
from sidecar.workapi._models import cursor_params

ROOT = Path(__file__).resolve().parent.parent
KEY = "acme-key-0123456789"
ENV = "env_acme"

ACME = wire.Provider(
    name="acme",
    default_base_url="https://work.acme.invalid",
    path_prefix="/acme/v3/spaces/{environment_id}/jobs/queue",
    credential_styles=(wire.CredentialStyle.X_API_KEY,),
    worker_id_header="Acme-Worker",
    extra_headers=MappingProxyType({"acme-api": "3", "acme-features": "work-queues"}),
    beta_header="acme-features",
    list_default_limit=5,
    list_max_limit=7,
    pagination=wire.Pagination.PAGE_OR_AFTER_ID,
    precondition_error_type="acme_precondition_error",
    request_id_header="acme-request-id",
    secret_on_poll=False,
    confirm_stop_with_force=False,
)
"""A third provider, unlike both real ones: another path shape, key header, limits and error type."""

ONCE = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=5.0), per_operation={})


async def test_a_third_provider_needs_only_a_profile_and_a_flavour() -> None:
    emulator = Emulator(
        EmulatorSettings(key=KEY, min_ttl_seconds=1), flavours=(*FLAVOURS, Flavour(ACME, strict_heartbeats=True))
    )
    async with (
        emulator.serve() as url,
        AdminClient(url) as admin,
        WorkApiClient(provider=ACME, api_key=KEY, environment_id=ENV, base_url=url, retry=ONCE) as client,
    ):
        queued = await admin.enqueue(ENV, 9)
        work = await client.poll(block_ms=wire.MAX_BLOCK_MS)
        assert work is not None and work.id == queued[0]["id"]
        assert work.secret is None, "this provider sends no secret on poll"
        assert (await client.ack(work.id)).state == "starting"
        beat = await client.heartbeat(work.id, expected_last_heartbeat=wire.NO_HEARTBEAT, desired_ttl_seconds=30)
        assert beat.lease_extended and beat.state == "active"

        await admin.steal_lease(ENV, work.id)
        with pytest.raises(LeaseLostError) as lost:
            await client.heartbeat(work.id, expected_last_heartbeat=beat.last_heartbeat)
        assert lost.value.error_type == "acme_precondition_error"

        seen = [item.id async for item in client.iter_work(page_size=ACME.list_max_limit)]
        assert sorted(seen) == sorted(item["id"] for item in queued)
        with pytest.raises(ValueError, match=f"1..{ACME.list_max_limit}"):
            await client.list_page(limit=ACME.list_max_limit + 1)
        assert (await client.stats()).pending == 0
        assert (await client.stop(work.id, force=True)).state == "stopped"

        log = await admin.requests()
        assert {entry["flavour"] for entry in log} == {"acme"}
        lists = [entry["query"] for entry in log if entry["operation"] == "list"]
        assert len(lists) == 2 and "page" in lists[1], "the second page continues from the first page's cursor"
        assert all(entry["worker_id"] == client.worker_id for entry in log if entry["operation"] == "poll")

        raw = httpx.AsyncClient(base_url=url)
        async with raw:
            path = ACME.work_path(ENV, "/stats")
            no_features = await raw.get(path, headers={"x-api-key": KEY, "acme-api": "3", "acme-request-id": "r-1"})
            assert no_features.status_code == 400
            assert (
                no_features.json()["error"]["message"] == "acme-features: this endpoint requires the work-queues beta"
            )
            assert no_features.headers["acme-request-id"] == "r-1" == no_features.json()["request_id"]
            bearer = await raw.get(path, headers={"authorization": f"Bearer {KEY}", **ACME.extra_headers})
            assert bearer.status_code == 200, "every flavour takes a Bearer credential"
            other = await raw.get(wire.QODER.work_path(ENV, "/stats"), headers={"authorization": f"Bearer {KEY}"})
            assert other.status_code == 200, "the built-in flavours still answer next to it"


async def test_a_flavour_not_in_the_table_is_not_served() -> None:
    emulator = Emulator(EmulatorSettings(key=KEY))
    async with emulator.serve() as url, AdminClient(url) as admin:
        client = WorkApiClient(provider=ACME, api_key=KEY, environment_id=ENV, base_url=url, retry=ONCE)
        async with client:
            with pytest.raises(Exception, match="404"):
                await client.stats()
        assert [entry["operation"] for entry in await admin.requests()] == ["unknown"]


def _provider_name_branches(path: Path) -> list[str]:
    """`x == "qoder"`-like comparisons of a provider or flavour (not an id style) with a provider's name."""
    names = set(wire.PROVIDERS)
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        if not any(isinstance(o, ast.Constant) and o.value in names for o in operands):
            continue
        others = " ".join(ast.get_source_segment(source, o) or "" for o in operands if not isinstance(o, ast.Constant))
        if "style" not in others:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_no_module_branches_on_a_provider_name() -> None:
    modules = [p for p in (ROOT / "sidecar").rglob("*.py") if "sidecar/work/" not in p.as_posix()]
    assert len(modules) > 20
    branches = [branch for path in modules for branch in _provider_name_branches(path)]
    assert branches == [], "per-provider differences belong in the profile (sidecar/wire.py) or the flavour table"


def test_both_sides_write_a_work_object_alike() -> None:
    emulator = Emulator(EmulatorSettings(key=KEY))
    [item] = emulator.enqueue(ENV)
    assert tuple(item) == wire.WORK_FIELDS
    client_side = Work.from_json(item).to_json()
    assert client_side == item and tuple(client_side) == wire.WORK_FIELDS


def test_operations_table_matches_the_client_and_the_emulator_routes() -> None:
    from sidecar.emulator._app import RouteTable

    table = RouteTable(FLAVOURS)
    for flavour in FLAVOURS:
        for op in wire.OPERATIONS.values():
            path = flavour.provider.work_path("env_1", op.route.format(work_id="work_1"))
            found = table.route(op.method, path)
            assert not isinstance(found, Exception), (flavour.name, op)
            assert (found.flavour, found.environment_id, found.operation) == (flavour, "env_1", op.name)
            assert found.work_id == ("work_1" if "{work_id}" in op.route else None)
    wrong = table.route("DELETE", wire.ANTHROPIC.work_path("env_1", "/work_1"))
    assert isinstance(wrong, Exception) and wrong.status == 405 and wrong.headers == {"allow": "GET, POST"}
    for bad in ("/work_1/", "//ack", "/work_1/ack/more", "x", "/"):
        path = wire.QODER.work_path("env_1", bad)
        answer = table.route("POST", path)
        assert isinstance(answer, Exception) and answer.status == 404, bad


def test_the_wire_module_is_a_leaf() -> None:
    tree = ast.parse((ROOT / "sidecar/wire.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "re", "collections", "dataclasses", "enum", "types", "typing"}
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


async def test_the_emulator_and_the_client_share_one_block_ms_limit() -> None:
    emulator = Emulator(EmulatorSettings(key=KEY))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url) as http:
        path, headers = wire.QODER.work_path(ENV, "/poll"), {"authorization": f"Bearer {KEY}"}
        for block_ms, status in ((wire.MAX_BLOCK_MS + 1, 400), (wire.MIN_BLOCK_MS - 1, 400), (wire.MIN_BLOCK_MS, 200)):
            assert (await http.get(path, params={"block_ms": block_ms}, headers=headers)).status_code == status
        async with WorkApiClient(provider="qoder", api_key=KEY, environment_id=ENV, base_url=url) as client:
            with pytest.raises(ValueError, match=str(wire.MAX_BLOCK_MS)):
                await client.poll(block_ms=wire.MAX_BLOCK_MS + 1)


def test_a_page_without_a_token_continues_after_its_last_id() -> None:
    body: dict[str, object] = {"data": [], "next_page": None, "first_id": "w1", "last_id": "w9", "has_more": True}
    page = WorkPage.from_json(body, wire.Pagination.PAGE_OR_AFTER_ID)
    assert page.next_cursor is not None and page.next_page is None
    assert cursor_params(page.next_cursor, wire.Pagination.PAGE_OR_AFTER_ID) == {"after_id": "w9"}
    assert WorkPage.from_json(body, wire.Pagination.PAGE).next_cursor is None, "only where the provider pages by id"
    token = WorkPage.from_json({**body, "next_page": "abc"}, wire.Pagination.PAGE_OR_AFTER_ID)
    assert token.next_cursor == "abc" and cursor_params("abc", wire.Pagination.PAGE_OR_AFTER_ID) == {"page": "abc"}
