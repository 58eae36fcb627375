"""`work-sidecar scaler` as a real process, configured like a container (WORK_SIDECAR_* variables), called
with grpcurl over server reflection (no .proto at hand) and with `work-sidecar health`."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess

from sidecar.cli import SERVE_FLAGS
from sidecar.scaler import SCALER_FLAGS
from tests.core.conftest import ENV, KEY, Api
from tests.deploy._harness import BIN, base_environment, run_command, serve_process, until_command_succeeds
from tests.examples.test_grpcurl import _grpcurl
from tests.helpers import eventually, free_port

SHARED_WITH_SERVE = {"--provider", "--api-url", "--environment-id", "--api-key", "--listen"}


def test_scaler_takes_serves_work_api_flags_and_variables() -> None:
    serve = {flag.name: flag.env for flag in SERVE_FLAGS}
    scaler = {flag.name: flag.env for flag in SCALER_FLAGS}
    for name in SHARED_WITH_SERVE:
        assert scaler[name] == serve[name], name
    text = subprocess.run(
        [str(BIN / "work-sidecar"), "scaler", "--help"], capture_output=True, text=True, timeout=30, check=True,
        env={**base_environment(), "COLUMNS": "200"},
    ).stdout  # fmt: skip
    for name in SHARED_WITH_SERVE:
        assert name in text and serve[name] in text
    listing = subprocess.run(
        [str(BIN / "work-sidecar"), "--help"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "scaler" in listing


async def test_api_url_is_required() -> None:
    env = base_environment() | {"WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV}
    code, output = await run_command([str(BIN / "work-sidecar"), "scaler"], env, timeout=30)
    assert code != 0 and "--api-url" in output
    assert KEY not in output


async def _grpcurl_json(*args: str) -> dict[str, object]:
    process = await asyncio.create_subprocess_exec(
        _grpcurl(), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()
    result: dict[str, object] = json.loads(stdout) if stdout.strip() else {}
    return result


async def _grpcurl_text(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        _grpcurl(), "-plaintext", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode()


async def test_scaler_process_answers_keda_over_reflection(api: Api) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = base_environment() | {
        "PATH": f"{BIN}:{base_environment()['PATH']}",
        "WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": address, "WORK_SIDECAR_STATS_INTERVAL": "0.2", "WORK_SIDECAR_LOG_FORMAT": "json",
    }  # fmt: skip
    async with serve_process(["work-sidecar", "scaler"], env) as served:
        health = ["work-sidecar", "health", "--sidecar", address]
        assert await until_command_succeeds(health, env, command_timeout=5, deadline=30, interval=0.2, served=served)
        code, services = await _grpcurl_text(address, "list")
        assert code == 0, services
        assert {"externalscaler.ExternalScaler", "grpc.health.v1.Health"} <= set(services.split())
        code, described = await _grpcurl_text(address, "describe", "externalscaler.ExternalScaler")
        for rpc in ("IsActive", "StreamIsActive", "GetMetricSpec", "GetMetrics", "StreamMetricSpec"):
            assert f"rpc {rpc} (" in described

        ref = {"name": "sandbox-worker", "namespace": "work", "scalerMetadata": {"targetItemsPerReplica": "2"}}
        spec = await _grpcurl_json("-d", json.dumps(ref), address, "externalscaler.ExternalScaler/GetMetricSpec")
        assert spec == {"metricSpecs": [{"metricName": "work-items", "targetSize": "2", "targetSizeFloat": 2}]}
        assert await _grpcurl_json("-d", json.dumps(ref), address, "externalscaler.ExternalScaler/IsActive") == {}

        await api.enqueue(3)
        request = json.dumps({"scaledObjectRef": ref, "metricName": "work-items"})

        async def three() -> bool:
            got = await _grpcurl_json("-d", request, address, "externalscaler.ExternalScaler/GetMetrics")
            return got == {"metricValues": [{"metricName": "work-items", "metricValue": "3", "metricValueFloat": 3}]}

        assert await eventually(three, timeout=10, interval=0.2)
        active = await _grpcurl_json("-d", json.dumps(ref), address, "externalscaler.ExternalScaler/IsActive")
        assert active == {"result": True}

        bad = json.dumps({**ref, "scalerMetadata": {"targetItemsPerReplica": "zero"}})
        code, output = await _grpcurl_text("-d", bad, address, "externalscaler.ExternalScaler/IsActive")
        assert code != 0 and "InvalidArgument" in output and "targetItemsPerReplica" in output

        workers = {r.get("worker_id") for r in await api.requests() if r["operation"] != "stats"}
        assert all(not str(w).startswith("work-sidecar-scaler") for w in workers), "the scaler took nothing"
        served.process.terminate()
        assert await asyncio.wait_for(served.process.wait(), 10) == 0
        assert KEY not in "\n".join(served.stderr_lines)


def test_start_up_failures_are_one_line_and_exit_2() -> None:
    """A taken port, a taken metrics port, an exporter nobody knows: one line on stderr, exit 2, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = base_environment() | {"WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_API_URL": "http://127.0.0.1:9"}
        cases = [
            (["--listen", f"127.0.0.1:{port}"], {}, f"cannot listen on 127.0.0.1:{port}"),
            (["--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{port}"], {}, "--metrics-listen"),
            (["--listen", "127.0.0.1:0"], {"OTEL_TRACES_EXPORTER": "no-such-exporter"}, "OTEL_TRACES_EXPORTER"),
        ]
        for args, extra, expected in cases:
            done = subprocess.run(
                [str(BIN / "work-sidecar"), "scaler", *args], capture_output=True, text=True, timeout=30,
                env=env | extra,
            )  # fmt: skip
            assert done.returncode == 2, (args, done.stderr)
            [line] = done.stderr.strip().splitlines()
            assert expected in line, (args, line)
