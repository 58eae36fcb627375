"""What probing costs a pod: the sidecar's CPU per kubelet grpc probe on the health listener (a new connection
per probe, as the kubelet dials), times the manifests' probe rates, stays within 5 mCPU per pod. An `exec`
probe would start a Python process each time: its cost is printed beside (`pytest -s`), not asserted."""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.core.conftest import ENV, KEY, Api
from tests.helpers import eventually, free_port, serving

from ._harness import base_environment
from .test_component import component

BIN = Path(sys.executable).parent / "work-sidecar"
PROBES = 150
BUDGET_MCPU = 5.0


async def _probe(address: str, service: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:  # one connection per probe, as the kubelet
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=3
        )
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def test_grpc_probes_cost_the_pod_at_most_5_millicpu(api: Api, short_dir: str) -> None:
    sidecar = component()
    probes = [sidecar[kind] for kind in ("readinessProbe", "livenessProbe")]  # after start-up: these two, for ever
    rate = sum(1.0 / probe.get("periodSeconds", 10) for probe in probes)
    services = [probe["grpc"].get("service", "") for probe in probes]
    health = f"127.0.0.1:{free_port()}"
    env = base_environment() | {
        "WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": f"unix://{short_dir}/s.sock", "WORK_SIDECAR_HEALTH_LISTEN": health,
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        str(BIN), "serve", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        assert await eventually(lambda: serving(health), timeout=30)
        watched = psutil.Process(process.pid)
        for service in services:  # warm: the first connection's one-time costs are not a probe's
            await _probe(health, service)

        began, cpu = time.monotonic(), _cpu(watched)
        await asyncio.sleep(2.0)  # the idle sidecar's own CPU over a window, to subtract
        idle_per_second = (_cpu(watched) - cpu) / (time.monotonic() - began)

        began, cpu = time.monotonic(), _cpu(watched)
        for n in range(PROBES):
            await _probe(health, services[n % len(services)])
        spent = _cpu(watched) - cpu - idle_per_second * (time.monotonic() - began)
        per_probe = max(spent, 0.0) / PROBES
        millicpu = per_probe * rate * 1000
        print(f"\ngrpc probe: {per_probe * 1e3:.3f} ms CPU in the sidecar per probe; {rate:g} probes/s -> "
              f"{millicpu:.3f} mCPU per pod")  # fmt: skip
        assert millicpu <= BUDGET_MCPU

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        runs = 2
        for _ in range(runs):  # what an exec probe would cost instead, for comparison (not asserted)
            subprocess.run([str(BIN), "health", "--sidecar", health], env=env, check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        exec_probe = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / runs
        print(f"exec probe: {exec_probe * 1e3:.0f} ms CPU per probe -> {exec_probe * rate * 1000:.1f} mCPU per pod")
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
