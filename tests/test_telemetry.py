"""OpenTelemetry end to end: the real sidecar process exports over OTLP/gRPC to an in-process receiver.

Checks the span tree (one `work` span per item with Work API client spans as children, heartbeats as
events, the sandbox's own span and the sidecar's gRPC server span joining through `traceparent`), the
metric values, and that no secret (API key, item secret, session token, lease token) appears in any
exported span, metric or log line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from sidecar.workapi import WorkSecret
from tests.core.conftest import ENV, KEY, Api, Watch
from tests.core.conftest import api as api
from tests.helpers import eventually

BIN = Path(sys.executable).parent


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.traces.append(request)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metrics.append(request)
            return metrics_service_pb2.ExportMetricsServiceResponse()

    def spans(self) -> list[Any]:
        with self.lock:
            return [s for r in self.traces for rs in r.resource_spans for ss in rs.scope_spans for s in ss.spans]

    def metric_points(self, name: str) -> list[Any]:
        with self.lock:
            found = []
            for request in self.metrics:
                for rm in request.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            if metric.name == name:
                                data = metric.WhichOneof("data")
                                assert data is not None, metric
                                found += list(getattr(metric, data).data_points)
            return found

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(r.SerializeToString() for r in [*self.traces, *self.metrics])


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # opentelemetry-proto ships no type stubs for its *_pb2_grpc modules
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(0)


def attrs(span: Any) -> dict[str, Any]:
    return {kv.key: _value(kv) for kv in span.attributes}


def _value(kv: KeyValue) -> Any:
    which = kv.value.WhichOneof("value")
    return getattr(kv.value, which) if which else None


@pytest.fixture
async def traced_sidecar(
    api: Api, receiver: tuple[Receiver, int], tmp_path: Path, short_dir: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str, Path]]:
    _, port = receiver
    socket = f"{short_dir}/otel.sock"  # a short path (Unix sockets), removed with the directory
    log_path = tmp_path / "sidecar.log"
    env = {
        **os.environ,
        "WORK_SIDECAR_API_KEY": KEY,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "300",
        "OTEL_SERVICE_NAME": "work-sidecar-test",
    }
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "work-sidecar"), "serve", "--api-url", api.url, "--environment-id", ENV,
            "--listen", f"unix://{socket}", "--ttl", "2", "--log-format", "json", "--log-level", "DEBUG",
            env=env, stdout=log, stderr=log,
        )  # fmt: skip
        yield proc, f"unix://{socket}", log_path
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 20)


async def test_one_trace_per_item_metrics_and_no_secrets(
    api: Api, receiver: tuple[Receiver, int], traced_sidecar: tuple[asyncio.subprocess.Process, str, Path]
) -> None:
    collected, port = receiver
    proc, address, log_path = traced_sidecar
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.WorkServiceStub(channel)
        await eventually(lambda: _ready(stub), timeout=20, message="sidecar up")
        watch = Watch(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="sandbox-otel"))).start()
        [queued] = await api.enqueue(1)
        item = await watch.assigned()
        assert item.traceparent.startswith("00-")
        trace_id = item.traceparent.split("-")[1]
        # Off the loop: the emulator answers in this loop, and a blocked loop starves the lease (TTL 2) of renewals.
        sandbox_span_id = await asyncio.to_thread(_sandbox_span, port, item.traceparent)
        metadata = (("traceparent", item.traceparent),)
        await stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token), metadata=metadata)
        await eventually(lambda: _beats(api, item.work.id), timeout=10, message="a renewal heartbeat")
        errors: list[str] = []
        for bad in (
            stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token="wrong")),
            stub.GetWork(pb.GetWorkRequest(work_id="work_nope", lease_token=item.lease_token)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await bad
            errors.append(f"{caught.value.details()} {caught.value.trailing_metadata()}")
        await stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), metadata=metadata
        )
        watch.cancel()
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 20) == 0  # shutdown flushes the exporters

    spans = collected.spans()
    in_trace = [s for s in spans if s.trace_id.hex() == trace_id]
    [work_span] = [s for s in in_trace if s.name == "work"]
    work_attrs = attrs(work_span)
    assert work_attrs["work.id"] == queued["id"]
    assert work_attrs["work.environment_id"] == ENV
    assert work_attrs["work.session_id"] == queued["data"]["id"]
    assert work_attrs["work_api.provider"] == "anthropic"
    assert work_attrs["sandbox.id"] == "sandbox-otel"
    assert work_attrs["work.final_state"] == "stopped"
    assert not work_span.parent_span_id, "the work span is the item's root"
    assert [e.name for e in work_span.events].count("heartbeat") >= 2

    children = [s for s in in_trace if s.parent_span_id == work_span.span_id]
    routes = {attrs(s).get("url.template") for s in children}
    prefix = "/v1/environments/{environment_id}/work"
    assert {prefix + "/{work_id}/ack", prefix + "/{work_id}/heartbeat", prefix + "/{work_id}/stop"} <= routes
    ack = next(s for s in children if attrs(s).get("url.template") == prefix + "/{work_id}/ack")
    assert attrs(ack)["http.response.status_code"] == 200 and attrs(ack)["work_api.request_id"].startswith("req_")
    assert ack.kind == 3  # SPAN_KIND_CLIENT

    sandbox = next(s for s in in_trace if s.span_id.hex() == sandbox_span_id)
    assert sandbox.parent_span_id == work_span.span_id, "the sandbox's own span joins the item's trace"
    server_spans = [s for s in in_trace if s.kind == 2]  # SPAN_KIND_SERVER: GetWork and StopWork
    assert {s.name for s in server_spans} >= {
        "/sidecar.work.v1.WorkService/GetWork",
        "/sidecar.work.v1.WorkService/StopWork",
    }
    assert all(s.parent_span_id == work_span.span_id for s in server_spans), "incoming traceparent is honoured"

    def total(name: str, **labels: str) -> float:
        points = collected.metric_points(name)
        matching = [p for p in points if all(attrs(p).get(k) == v for k, v in labels.items())]
        return max((_point_value(p) for p in matching), default=0)

    assert total("work_sidecar.acks", result="ok") == 1
    assert total("work_sidecar.items.completed", final_state="stopped") == 1
    assert total("work_sidecar.heartbeats", result="ok") >= 2
    assert total("work_sidecar.polls", result="item") == 1
    assert total("work_sidecar.dispatch.duration") == 1
    assert total("work_sidecar.api.request.duration", operation="ack") >= 1
    assert collected.metric_points("work_sidecar.leases.active")

    secret = WorkSecret(item.secret)
    forbidden = [KEY, item.secret, secret.decode().sessions_token, item.lease_token]
    exported = collected.raw()
    logs = log_path.read_bytes()
    assert b'"msg": "work assigned"' in logs and b"trace_id" in logs, "JSON logs with trace ids"
    for needle in forbidden:
        assert needle.encode() not in exported, "a secret was exported in telemetry"
        assert needle.encode() not in logs, "a secret was logged"
        assert all(needle not in error for error in errors), "a secret was in an error message"


def _point_value(point: Any) -> float:
    if point.DESCRIPTOR.name == "HistogramDataPoint":
        return float(point.count)
    return float(point.as_int if point.HasField("as_int") else point.as_double)


async def _ready(stub: pb_grpc.WorkServiceAsyncStub) -> bool:
    try:
        await stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _beats(api: Api, work_id: str) -> bool:
    return len(await api.requests("heartbeat", work_id)) >= 2


def _sandbox_span(port: int, traceparent: str) -> str:
    """A sandbox process of its own: extracts the traceparent and exports one span as its child."""
    code = f"""
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint="http://127.0.0.1:{port}", insecure=True)))
ctx = propagate.extract({{"traceparent": "{traceparent}"}})
with provider.get_tracer("sandbox").start_as_current_span("sandbox work", context=ctx) as span:
    print(format(span.get_span_context().span_id, "016x"))
provider.shutdown()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    return out.stdout.strip()


async def test_prometheus_scrape_endpoint(api: Api, tmp_path: Path) -> None:
    import socket as sockets

    import httpx

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORK_SIDECAR_API_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "serve", "--api-url", api.url, "--environment-id", ENV,
        "--listen", f"unix://{tmp_path}/p.sock", "--metrics-listen", f"127.0.0.1:{port}",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        async def scraped() -> str:
            try:
                async with httpx.AsyncClient() as http:
                    response = await http.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
            except httpx.HTTPError:
                return ""
            return response.text if "work_sidecar_watchers" in response.text else ""

        text = await eventually(scraped, timeout=20, message="the Prometheus endpoint serves the sidecar's gauges")
        assert "work_sidecar_leases_active" in text and "work_sidecar_capacity_free" in text
        assert KEY not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_every_histogram_on_metrics_has_buckets_for_its_unit(api: Api, short_dir: str) -> None:
    """A live sidecar's /metrics after an item: every histogram is in seconds with buckets from about a millisecond
    up (not OpenTelemetry's default millisecond boundaries), as declared, and the item's dispatch lands in a bucket
    below a second. Every instrument family seen is a declared one, under the name docs/telemetry.md gives."""
    import socket as sockets

    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from sidecar._instruments import CATALOG

    with sockets.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    socket = f"unix://{short_dir}/h.sock"
    env = {**os.environ, "WORK_SIDECAR_API_KEY": KEY}
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", socket,
        "--metrics-listen", f"127.0.0.1:{port}", "--state-dir", f"{short_dir}/state",
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(socket) as channel:
            stub = pb_grpc.WorkServiceStub(channel)
            await eventually(lambda: _ready(stub), timeout=20, message="sidecar up")
            watch = Watch(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="sandbox-histograms"))).start()
            await api.enqueue(1)
            item = await watch.assigned()
            await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
            watch.cancel()
        async with httpx.AsyncClient() as http:

            async def scraped() -> str:
                text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)).text
                return text if "work_sidecar_item_duration_seconds_count" in text else ""

            text = await eventually(scraped, timeout=20, message="the item's end is on /metrics")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0

    declared = {metric.prometheus_name: metric for metric in CATALOG.values()}
    histograms = 0
    seen: set[str] = set()
    for family in text_string_to_metric_families(text):
        if not family.name.startswith("work_sidecar"):
            continue
        name = family.name + ("_total" if family.type == "counter" else "")
        seen.add(name)
        assert name in declared, f"{name} on /metrics is not a declared instrument"
        if family.type != "histogram":
            continue
        histograms += 1
        assert name.endswith("_seconds"), f"{name}: a histogram whose unit is not seconds"
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                series.setdefault(labels, []).append((float(sample.labels["le"]), sample.value))
        assert series, f"{name} has no buckets"
        for buckets in series.values():
            bounds = sorted(bound for bound, _ in buckets if bound != float("inf"))
            assert 0.0005 <= bounds[0] <= 0.002, f"{name}: the first bucket is not about a millisecond: {bounds[:3]}"
            assert bounds[-1] >= 3600, f"{name}: the buckets end at {bounds[-1]} s, short of a long item"
            assert tuple(bounds) == declared[name].buckets, name
    assert histograms == 3, f"the three duration histograms are on /metrics, not {histograms}"
    dispatch = next(
        f for f in text_string_to_metric_families(text) if f.name == "work_sidecar_dispatch_duration_seconds"
    )
    below_a_second = [s.value for s in dispatch.samples if s.name.endswith("_bucket") and s.labels["le"] == "1.0"]
    count = [s.value for s in dispatch.samples if s.name.endswith("_count")]
    assert below_a_second == count == [1.0], "the item's dispatch is counted in a bucket below a second"
    expected = {
        "work_sidecar_polls_total", "work_sidecar_acks_total", "work_sidecar_heartbeats_total",
        "work_sidecar_items_completed_total", "work_sidecar_dispatch_duration_seconds",
        "work_sidecar_item_duration_seconds", "work_sidecar_api_request_duration_seconds",
        "work_sidecar_leases_active", "work_sidecar_watchers", "work_sidecar_capacity_free", "work_sidecar_ready",
        "work_sidecar_journal_writable", "work_sidecar_journal_records_total",
    }  # fmt: skip
    assert expected <= seen, f"missing from /metrics: {sorted(expected - seen)}"
