"""The scaler observes itself: a live `work-sidecar scaler` process, scraped on `--metrics-listen` (readings, their
age, read errors, call latency and errors by RPC, in second-scale buckets) and exporting its spans over OTLP to a
real receiver, under the same `OTEL_*` settings as `serve`."""

from __future__ import annotations

import math

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sidecar.keda import externalscaler_pb2 as pb
from sidecar.keda import externalscaler_pb2_grpc as pb_grpc
from sidecar.scaler._telemetry import LATENCY_BUCKETS
from tests.core.conftest import ENV, KEY, Api
from tests.deploy._harness import BIN, base_environment, serve_process, until_command_succeeds
from tests.helpers import eventually, free_port
from tests.test_telemetry import Receiver, attrs
from tests.test_telemetry import receiver as receiver


async def _scrape(port: int) -> list[Sample]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text
    assert KEY not in text
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float | None:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


async def test_scaler_metrics_and_traces(api: Api, receiver: tuple[Receiver, int]) -> None:
    collector, otlp_port = receiver
    metrics_port, port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    env = base_environment() | {
        "PATH": f"{BIN}:{base_environment()['PATH']}",
        "WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": address, "WORK_SIDECAR_STATS_INTERVAL": "0.2",
        "WORK_SIDECAR_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }  # fmt: skip
    async with serve_process(["work-sidecar", "scaler"], env) as served:
        health = ["work-sidecar", "health", "--sidecar", address]
        assert await until_command_succeeds(health, env, command_timeout=5, deadline=30, interval=0.2, served=served)
        await api.enqueue(3)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ExternalScalerStub(channel)
            ref = pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata={"includeInProgress": "true"})

            async def three() -> bool:
                answer = await stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="work-items"))
                return answer.metricValues[0].metricValueFloat == 3

            assert await eventually(three, timeout=10)
            assert (await stub.IsActive(ref)).result
            bad = pb.ScaledObjectRef(name="w", namespace="n", scalerMetadata={"targetItemsPerReplica": "0"})
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.IsActive(bad)
            await api.fault(operation="stats", status=503, count=2)

            async def scraped() -> list[Sample] | None:
                samples = await _scrape(metrics_port)
                errors = _value(samples, "work_sidecar_scaler_read_errors_total", error="ServerError")
                return samples if errors and errors >= 1 else None

            found = await eventually(scraped, timeout=20, message="a failed read is counted")
            assert found is not None
            samples = found

        items = "work_sidecar_scaler_reading_items"
        assert _value(samples, items, environment_id=ENV, state="queued") == 3
        assert _value(samples, items, environment_id=ENV, state="pending") == 0
        assert _value(samples, items, environment_id=ENV, state="in_progress") == 0
        age = _value(samples, "work_sidecar_scaler_reading_age_seconds", environment_id=ENV)
        assert age is not None and 0 <= age < 30
        assert _value(samples, "work_sidecar_scaler_environments") == 1
        assert _value(samples, "work_sidecar_scaler_rpc_errors_total", rpc="IsActive", code="INVALID_ARGUMENT") == 1

        latency = "work_sidecar_scaler_rpc_duration_seconds"
        assert (_value(samples, f"{latency}_count", rpc="GetMetrics", code="OK") or 0) >= 1
        assert _value(samples, f"{latency}_count", rpc="IsActive", code="OK") == 1
        bounds = sorted(
            float(s.labels["le"]) for s in samples
            if s.name == f"{latency}_bucket" and s.labels["rpc"] == "IsActive" and s.labels["code"] == "OK"
        )  # fmt: skip
        assert bounds == [*LATENCY_BUCKETS, math.inf], "second-scale buckets, in seconds"
        fast = _value(samples, f"{latency}_bucket", rpc="IsActive", code="OK", le="1.0")
        assert fast == 1, "an answer from the cached reading takes well under a second"

        def spans_seen() -> bool:
            names = {span.name for span in collector.spans()}
            return {"scaler.read", "/externalscaler.ExternalScaler/GetMetrics"} <= names

        assert await eventually(spans_seen, timeout=20, message="read and call spans exported")
        reads = [s for s in collector.spans() if s.name == "scaler.read"]
        assert any(attrs(s).get("work.environment_id") == ENV for s in reads)
        read_ids = {s.span_id for s in reads}
        assert any(s.parent_span_id in read_ids for s in collector.spans()), "Work API spans are children of a read"
        assert not any(s.name.endswith("/Check") for s in collector.spans()), "health checks make no spans"
        assert KEY.encode() not in collector.raw()
        services = {
            attrs(resource_spans.resource).get("service.name")
            for request in collector.traces
            for resource_spans in request.resource_spans
        }
        assert services == {"work-sidecar-scaler"}, "the scaler's own service name unless OTEL_SERVICE_NAME says"
