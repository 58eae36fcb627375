"""Secrets never leave in an error: the Work API key, an item's secret, its session token and the lease token are
redacted by value in every error a sandbox reads, every log line and every span, whatever their shape.

The Work API (the emulator) answers every operation with an error whose text quotes all four. The key here is a
short one (34 characters): it does not look like a token, so only redaction by value catches it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.core import _telemetry as core_telemetry
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import _telemetry as workapi_telemetry

from .conftest import KEY, Api, SidecarFactory


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    monkeypatch.setattr(workapi_telemetry, "_tracer", tracer)
    monkeypatch.setattr(core_telemetry, "_tracer", tracer)
    yield exporter
    provider.shutdown()


async def _keepalive(stub: object, item: pb.WorkAssigned) -> AsyncGenerator[pb.KeepAliveResponse]:
    async def requests() -> AsyncIterator[pb.KeepAliveRequest]:
        yield pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token)

    async for response in stub.KeepAlive(requests()):  # type: ignore[attr-defined]
        yield response


def _span_text(exporter: InMemorySpanExporter) -> str:
    return repr(
        [
            (
                s.name,
                s.status.description,
                dict(s.attributes or {}),
                [(e.name, dict(e.attributes or {})) for e in s.events],
            )
            for s in exporter.get_finished_spans()
        ]
    )


async def test_the_api_key_is_redacted_by_value_wherever_the_item_secret_is(
    api: Api, start_sidecar: SidecarFactory, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 8.
    The Work API key could reach a sandbox: when the API's error text quoted the item secret, the session token,
    the lease token and the API key, StopWork's error showed the first three redacted and the key in full."""
    caplog.set_level(logging.DEBUG)
    running = await start_sidecar(ttl_seconds=4)
    watch, item = await running.take_one(api)
    assert item.secret and item.session_credentials.sessions_token, "the emulator hands out secrets"
    secrets = {
        "key": KEY,
        "secret": item.secret,
        "sessions_token": item.session_credentials.sessions_token,
        "lease_token": item.lease_token,
    }
    quoted = "refused: key=" + KEY + " secret=" + item.secret
    quoted += " token=" + item.session_credentials.sessions_token + " lease=" + item.lease_token
    await api.fault("*", status=400, message=quoted, count=None)

    seen: list[str] = []
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "StopWork": lambda: running.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), timeout=5
        ),
        "UpdateWorkMetadata": lambda: running.stub.UpdateWorkMetadata(
            pb.UpdateWorkMetadataRequest(work_id=item.work.id, lease_token=item.lease_token, set={"k": "v"}),
            timeout=5,
        ),
        "GetWork": lambda: running.stub.GetWork(
            pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token), timeout=5
        ),
        "ListWork": lambda: running.stub.ListWork(pb.ListWorkRequest(), timeout=5),
        "GetQueueStats": lambda: running.stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=5),
    }
    for name, call in calls.items():
        try:
            answer = await call()
        except grpc.aio.AioRpcError as exc:
            text = f"{exc.code()} {exc.details()} {exc.trailing_metadata()!r} {exc.debug_error_string()}"
        else:
            text = str(answer)
        seen.append(f"{name}: {text}")
    assert any("refused" in text for text in seen), f"the API's error text reached the sandbox: {seen}"

    keepalive = _keepalive(running.stub, item)
    lease = (await anext(keepalive)).lease
    seen.append(f"KeepAlive: {lease}")
    lost = await watch.next("lease_lost", timeout=10)  # every renewal refused: fenced
    seen.append(f"WatchWork: {lost}")
    await keepalive.aclose()

    logged = [
        f"{record.getMessage()} {record.__dict__!r}" for record in caplog.records if record.name.startswith("sidecar")
    ]
    assert any("refused" in line for line in logged), "the API's error text was logged"
    for where, texts in (("a sandbox", seen), ("the log", logged), ("a span", [_span_text(spans)])):
        for name, value in secrets.items():
            leaked = [text[:200] for text in texts if value in text]
            assert not leaked, f"the {name} reached {where}: {leaked}"
    watch.cancel()
