"""Every exporter value the OpenTelemetry specification defines, through the real `work-sidecar serve`.

Each either works (the process serves, and the exporter is seen exporting: an OTLP receiver, stdout, a Prometheus
scrape) or is refused at start in one line on stderr with exit status 2, before anything is served.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.telemetry import EXPORTERS
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Api, Watch
from tests.core.conftest import api as api
from tests.helpers import eventually
from tests.test_telemetry import Receiver
from tests.test_telemetry import receiver as receiver

BIN = Path(sys.executable).parent

REFUSED = [
    ("OTEL_TRACES_EXPORTER", "zipkin"),
    ("OTEL_TRACES_EXPORTER", "jaeger"),
    ("OTEL_TRACES_EXPORTER", "logging"),
    ("OTEL_TRACES_EXPORTER", "prometheus"),
    ("OTEL_METRICS_EXPORTER", "logging"),
    ("OTEL_METRICS_EXPORTER", "otlp,zipkin"),
    ("OTEL_LOGS_EXPORTER", "otlp"),
    ("OTEL_LOGS_EXPORTER", "logging"),
    ("OTEL_TRACES_EXPORTER", "carrier-pigeon"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
]
"""The specification's values not supported here (and one it does not define), each refused in one line."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _environment(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "WORK_SIDECAR_"))}
    return {**env, "WORK_SIDECAR_API_KEY": KEY, **extra}


@pytest.mark.parametrize(("variable", "value"), REFUSED)
async def test_a_value_not_supported_is_refused_in_one_line(variable: str, value: str, short_dir: str) -> None:
    env = _environment({variable: value})
    if variable.endswith("_PROTOCOL"):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4318"
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "serve", "--api-url", "http://127.0.0.1:9", "--environment-id", ENV,
        "--listen", f"unix://{short_dir}/refused.sock", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("work-sidecar: "), lines
    assert f"{variable}={value.split(',')[-1]}" in lines[0], lines
    assert not Path(f"{short_dir}/refused.sock").exists(), "nothing was served"


def test_the_values_this_process_takes_are_the_specifications() -> None:
    """The supported sets name only values the specification defines for each signal."""
    specification = {
        "OTEL_TRACES_EXPORTER": {"otlp", "zipkin", "console", "logging", "jaeger", "none"},
        "OTEL_METRICS_EXPORTER": {"otlp", "prometheus", "console", "logging", "none"},
        "OTEL_LOGS_EXPORTER": {"otlp", "console", "logging", "none"},
    }
    assert set(EXPORTERS) == set(specification)
    for variable, supported in EXPORTERS.items():
        assert set(supported) <= specification[variable]
    refused = {(variable, value) for variable, value in REFUSED}
    for variable, defined in specification.items():
        for value in defined - set(EXPORTERS[variable]):
            assert (variable, value) in refused, f"{variable}={value} is neither supported nor tested as refused"


@asynccontextmanager
async def _serving(
    api: Api, env: dict[str, str], socket_path: str, stdout: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    with stdout.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "work-sidecar"), "serve", "--api-url", api.url, "--environment-id", ENV,
            "--listen", f"unix://{socket_path}", "--log-format", "json", "--drain-timeout", "5",
            env=env, stdout=out, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with grpc.aio.insecure_channel(f"unix://{socket_path}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                await eventually(lambda: _serving_now(health, proc), timeout=30, message="the sidecar serves")
                stub = pb_grpc.WorkServiceStub(channel)
                watch = Watch(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="otel-values"))).start()
                await api.enqueue(1)
                item = await watch.assigned()
                await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
                watch.cancel()
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()[-3000:]


async def _serving_now(health: health_pb2_grpc.HealthStub, proc: asyncio.subprocess.Process) -> bool:
    assert proc.returncode is None, "the sidecar exited"
    try:
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def test_every_supported_value_exports(
    api: Api, receiver: tuple[Receiver, int], short_dir: str, tmp_path: Path
) -> None:
    """otlp, console and prometheus at once (comma lists), and logs to the console."""
    collected, port = receiver
    prometheus_port = _free_port()
    env = _environment(
        {
            "OTEL_TRACES_EXPORTER": "otlp,console",
            "OTEL_METRICS_EXPORTER": "otlp,prometheus,console",
            "OTEL_LOGS_EXPORTER": "console",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_PROMETHEUS_HOST": "127.0.0.1",
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(prometheus_port),
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_METRIC_EXPORT_INTERVAL": "300",
        }
    )
    stdout = tmp_path / "stdout"
    async with _serving(api, env, f"{short_dir}/all.sock", stdout):
        async with httpx.AsyncClient() as http:
            scraped = await http.get(f"http://127.0.0.1:{prometheus_port}/metrics", timeout=5)
        assert "work_sidecar_acks_total" in scraped.text, "OTEL_METRICS_EXPORTER=prometheus serves the metrics"
        await eventually(lambda: collected.spans(), timeout=10, message="spans over OTLP")
        await eventually(lambda: collected.metric_points("work_sidecar.acks"), timeout=10, message="OTLP metrics")
    printed = stdout.read_text()
    assert '"name": "work"' in printed, "the console span exporter printed the item's span"
    assert "work_sidecar.acks" in printed, "the console metric exporter printed the metrics"


async def test_none_everywhere_exports_nothing(api: Api, short_dir: str, tmp_path: Path) -> None:
    prometheus_port = _free_port()
    env = _environment(
        {
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # ignored: none wins
            "OTEL_EXPORTER_PROMETHEUS_PORT": str(prometheus_port),
        }
    )
    stdout = tmp_path / "stdout"
    async with _serving(api, env, f"{short_dir}/none.sock", stdout):
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", prometheus_port)) != 0, "no Prometheus endpoint"
    assert stdout.read_text() == ""
