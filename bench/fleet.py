"""`python -m bench --fleet`: a fleet on one machine. K sidecar processes (one sandbox each, as K pods with a
native sidecar), `work-sidecar scaler` and one emulator, through three traffic patterns:

- idle: nothing queued; the fleet's Work API requests per minute (the scaler's stats reads counted apart);
- burst: 2K items at once, each held `hold` seconds by its sandbox (K sandboxes: about two rounds);
- trickle: items one at a time at `trickle_gap` intervals, stopped at once (every sandbox free: pure dispatch
  latency).

Then, for one-sandbox pods (issue #13, "idle cost"), K sidecars (with `--idle-poll-gap` 0 and `pod_gap`) against K
official SDK workers: the fleet's idle Work API requests per minute, and dispatch p50/p99 of `phase_items` items
enqueued one at a time at seeded-random gaps (so each lands at a random phase of every poll/sleep cycle).

And a ScaledJob after a burst: 2K items at once; every `job_polling` seconds a controller does what KEDA's
`accurate` strategy does with the scaler's metric (new Jobs = items needing a replica - pending Jobs, capped by
`maxReplicaCount` - running Jobs), and each Job is a real pod's worth of processes: `work-sidecar serve`, then
`work-sidecar exec --once --idle-exit S` (as deploy/keda/scaledjob runs it). Reported: the Jobs created, those that
found no item (sat idle), and how long they sat idle before `--idle-exit` ended them.

Meanwhile a sampler asks the scaler's GetMetrics every `sample_every` seconds, as KEDA would, and turns the
metric into the replicas a ScaledObject with targetItemsPerReplica=1 would ask for (ceil(items / 1)).
Checked on every run: no item is ever held by two sandboxes at once. Writes DIR/fleet.{json,md} and
DIR/fleet_replicas.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from sidecar.keda import externalscaler_pb2 as kpb
from sidecar.keda import externalscaler_pb2_grpc as kpb_grpc

from ._procs import BIN, CHILDREN, KEY, Child, EmulatorProcess, count_operations, free_port, percentile
from ._provenance import provenance
from .sandboxes import Fleet

METADATA = {"targetItemsPerReplica": "1", "activationThreshold": "0"}


@dataclass(frozen=True)
class FleetPreset:
    name: str
    ks: tuple[int, ...]
    idle_seconds: float
    hold: float
    trickle_items: int
    trickle_gap: float
    stats_interval: float
    sample_every: float
    tail_seconds: float
    pod_gap: float = 2.0
    """The `--idle-poll-gap` compared with none (2 s: the middle of the SDK's 1-3 s sleep)."""
    pod_idle_seconds: float = 15.0
    phase_items: int = 20
    phase_gap: tuple[float, float] = (0.3, 2.5)
    seed: int = 20261202
    job_polling: float = 5.0
    """Seconds between the ScaledJob controller's checks (KEDA's pollingInterval in deploy/keda/scaledjob)."""
    job_idle_exit: float = 30.0
    """`exec --idle-exit` of the simulated Jobs (as in deploy/keda/scaledjob)."""
    job_max: int = 50
    """maxReplicaCount of the ScaledJob."""
    job_ks: tuple[int, ...] = (1, 5)
    """Burst sizes (2K items) of the ScaledJob runs: each Job starts two interpreters, so fewer than `ks`."""


FLEET_FULL = FleetPreset("full", (1, 10, 50), 20.0, 2.0, 20, 0.5, 1.0, 0.25, 4.0)
FLEET_SMOKE = FleetPreset(
    "smoke", (1, 2), 1.5, 0.6, 3, 0.2, 0.2, 0.1, 1.0, pod_gap=0.5, pod_idle_seconds=1.0, phase_items=3,
    phase_gap=(0.05, 0.3), job_polling=0.5, job_idle_exit=1.0, job_max=6, job_ks=(1,),
)  # fmt: skip


# -- processes ------------------------------------------------------------------------------------------------


START_BATCH = 10


async def _wait_health(target: str, child: Child, name: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{child.tail()}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _sidecars(
    emulator: EmulatorProcess, environment_id: str, k: int, extra: list[str] | None = None
) -> AsyncIterator[list[str]]:
    """K `work-sidecar serve` processes of one environment, each on its own socket (K pods). Started
    `START_BATCH` at a time, each batch serving before the next starts: 50 interpreters starting at once on
    2 slow cores took more than a minute for some of them."""
    children: list[Child] = []
    targets = []
    try:
        for first in range(0, k, START_BATCH):
            batch = []
            for index in range(first, min(k, first + START_BATCH)):
                target = f"unix://{CHILDREN.log_dir}/{environment_id}-{index}.sock"
                argv = [str(BIN / "work-sidecar"), "serve", "--api-url", emulator.url, "--api-key", KEY]
                argv += ["--environment-id", environment_id, "--listen", target, "--log-format", "json"]
                argv += ["--worker-id", f"pod-{index}", "--log-level", "WARNING", *(extra or [])]
                child = CHILDREN.start(f"sidecar-{environment_id}-{index}", argv)
                children.append(child)
                targets.append(target)
                batch.append((target, child))
            await asyncio.gather(*(_wait_health(t, c, c.log_path.stem) for t, c in batch))
        yield targets
    finally:
        for child in children:
            child.kill()
            CHILDREN.discard(child)


@contextlib.asynccontextmanager
async def _scaler(emulator: EmulatorProcess, environment_id: str, interval: float) -> AsyncIterator[str]:
    address = f"127.0.0.1:{free_port()}"
    argv = [str(BIN / "work-sidecar"), "scaler", "--api-url", emulator.url, "--api-key", KEY]
    argv += ["--environment-id", environment_id, "--listen", address, "--stats-interval", str(interval)]
    argv += ["--log-format", "json", "--worker-id", "fleet-scaler"]
    child = CHILDREN.start(f"scaler-{environment_id}", argv)
    try:
        await _wait_health(address, child, "the scaler")
        yield address
    finally:
        child.stop()
        CHILDREN.discard(child)


# -- one K ----------------------------------------------------------------------------------------------------


class Sampler:
    """Asks the scaler what KEDA asks it, every `every` seconds."""

    def __init__(self, address: str, every: float, t0: float, fleets: list[Fleet]) -> None:
        self.address = address
        self.fleets = fleets
        self.every = every
        self.t0 = t0
        self.samples: list[dict[str, float]] = []
        self.errors = 0

    async def run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = kpb_grpc.ExternalScalerStub(channel)
            ref = kpb.ScaledObjectRef(name="fleet", namespace="bench", scalerMetadata=METADATA)
            request = kpb.GetMetricsRequest(scaledObjectRef=ref, metricName="work-items")
            while True:
                try:
                    answer = await stub.GetMetrics(request, timeout=5)
                    items = answer.metricValues[0].metricValueFloat
                    busy = sum(len(set(f.assigned) - set(f.stopped)) for f in self.fleets)
                    self.samples.append(
                        {
                            "t": round(time.monotonic() - self.t0, 3),
                            "items": items,
                            "replicas": math.ceil(items / 1),
                            "busy": busy,
                        }
                    )
                except grpc.aio.AioRpcError:
                    self.errors += 1
                await asyncio.sleep(self.every)  # the sampling period (KEDA's polling), not a synchronisation


def _double_held(fleets: list[Fleet]) -> tuple[int, int]:
    """(items assigned to more than one sandbox, of which held by two at overlapping times)."""
    holders: dict[str, list[tuple[float, float]]] = {}
    for sandbox in fleets:
        for work_id, at in sandbox.assigned.items():
            holders.setdefault(work_id, []).append((at, sandbox.stopped.get(work_id, math.inf)))
    twice = {w: spans for w, spans in holders.items() if len(spans) > 1}
    overlapping = 0
    for spans in twice.values():
        spans.sort()
        if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
            overlapping += 1
    return len(twice), overlapping


def _latencies(enqueued: dict[str, float], fleets: list[Any]) -> dict[str, float | None]:
    assigned: dict[str, float] = {}
    for sandbox in fleets:
        for work_id, at in sandbox.assigned.items():
            assigned.setdefault(work_id, at)
    values = [(assigned[w] - t) * 1000 for w, t in enqueued.items() if w in assigned]
    return {
        "items": len(enqueued),
        "dispatched": len(values),
        "p50_ms": percentile(values, 50),
        "p99_ms": percentile(values, 99),
    }


async def _all_done(fleets: list[Fleet], ids: list[str], within: float) -> bool:
    deadline = time.monotonic() + within
    while True:
        stopped: set[str] = set()
        for sandbox in fleets:
            stopped |= set(sandbox.stopped)
        if set(ids) <= stopped:
            return True
        if time.monotonic() > deadline:
            return False
        changes = [asyncio.ensure_future(s.changed.wait()) for s in fleets]
        for s in fleets:
            s.changed.clear()
        await asyncio.wait(changes, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        for change in changes:
            change.cancel()


async def run_k(emulator: EmulatorProcess, k: int, preset: FleetPreset) -> dict[str, Any]:
    environment_id = f"env_fleet_{k}"
    async with (
        _sidecars(emulator, environment_id, k) as targets,
        _scaler(emulator, environment_id, preset.stats_interval) as scaler,
    ):
        fleets = [Fleet(target, streams=1, max_in_flight=1, hold=preset.hold) for target in targets]
        await asyncio.gather(*(f.start() for f in fleets))
        try:
            t0 = time.monotonic()
            sampler = Sampler(scaler, preset.sample_every, t0, fleets)
            sampling = asyncio.ensure_future(sampler.run())
            phases: dict[str, list[float]] = {}

            # idle
            await asyncio.sleep(min(2.0, preset.idle_seconds))  # settle into steady state
            seq = await emulator.next_seq()
            start = time.monotonic()
            await asyncio.sleep(preset.idle_seconds)  # the measured window itself
            entries, _ = await emulator.requests(seq)
            window = time.monotonic() - start
            phases["idle"] = [start - t0, time.monotonic() - t0]
            sidecar_ops = count_operations(entries, environment_id)
            scaler_reads = sum(1 for e in entries if e.environment_id == environment_id and e.operation == "stats")
            idle = {
                "fleet_per_minute": sum(sidecar_ops.values()) / window * 60,
                "per_sidecar_per_minute": sum(sidecar_ops.values()) / window * 60 / k,
                "scaler_stats_per_minute": scaler_reads / window * 60,
                "by_operation": sidecar_ops,
            }

            # burst
            start = time.monotonic()
            enqueued_at = time.monotonic()
            ids = await emulator.enqueue(environment_id, 2 * k)
            burst_enqueued = dict.fromkeys(ids, enqueued_at)
            burst_done = await _all_done(fleets, ids, within=60 + 4 * preset.hold)
            phases["burst"] = [start - t0, time.monotonic() - t0]

            # trickle: items stopped at once, so every sandbox is free and the latency is dispatch alone
            for sandbox in fleets:
                sandbox.hold = 0.0
            start = time.monotonic()
            trickle_enqueued: dict[str, float] = {}
            for _ in range(preset.trickle_items):
                at = time.monotonic()
                [work_id] = await emulator.enqueue(environment_id, 1)
                trickle_enqueued[work_id] = at
                await asyncio.sleep(preset.trickle_gap)  # the arrival pattern itself
            trickle_done = await _all_done(fleets, list(trickle_enqueued), within=30 + 2 * preset.hold)
            phases["trickle"] = [start - t0, time.monotonic() - t0]
            await asyncio.sleep(preset.tail_seconds)  # the scaler's view going back to zero
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
            twice, overlapping = _double_held(fleets)
            return {
                "k": k,
                "idle": idle,
                "burst": {**_latencies(burst_enqueued, fleets), "completed": burst_done},
                "trickle": {**_latencies(trickle_enqueued, fleets), "completed": trickle_done},
                "items_assigned_twice": twice,
                "items_held_by_two_at_once": overlapping,
                "lost": sum(f.lost for f in fleets),
                "scaler": {
                    "samples": sampler.samples,
                    "errors": sampler.errors,
                    "max_replicas": max((s["replicas"] for s in sampler.samples), default=0),
                    "final_replicas": sampler.samples[-1]["replicas"] if sampler.samples else None,
                },
                "phases": phases,
            }
        finally:
            await asyncio.gather(*(f.close() for f in fleets), return_exceptions=True)


# -- a ScaledJob after a burst: Jobs that found no item -------------------------------------------------------


@dataclass
class Job:
    """One simulated Job: its pod's sidecar and sandbox (`exec --once --idle-exit`), and when things happened."""

    index: int
    created: float
    ready: float | None = None
    ended: float | None = None
    took_item: bool = False
    exit_code: int | None = None


async def _run_job(job: Job, emulator: EmulatorProcess, environment_id: str, preset: FleetPreset) -> None:
    target = f"unix://{CHILDREN.log_dir}/job-{environment_id}-{job.index}.sock"
    argv = [str(BIN / "work-sidecar"), "serve", "--api-url", emulator.url, "--api-key", KEY]
    argv += ["--environment-id", environment_id, "--listen", target, "--log-format", "json", "--log-level", "WARNING"]
    sidecar = CHILDREN.start(f"job-sidecar-{environment_id}-{job.index}", argv)
    marker = CHILDREN.log_dir / f"job-{environment_id}-{job.index}.took"
    try:
        await _wait_health(target, sidecar, sidecar.name)
        job.ready = time.monotonic()  # the pod is Running: KEDA no longer counts the Job as pending
        argv = [str(BIN / "work-sidecar"), "exec", "--sidecar", target, "--once"]
        argv += ["--idle-exit", str(preset.job_idle_exit), "--log-format", "json", "--"]
        argv += ["/bin/sh", "-c", f': > "{marker}"; sleep {preset.hold}']
        sandbox = CHILDREN.start(f"job-exec-{environment_id}-{job.index}", argv)
        job.exit_code = await asyncio.to_thread(sandbox.popen.wait)
        job.took_item = marker.exists()
        CHILDREN.discard(sandbox)
    finally:
        job.ended = time.monotonic()
        sidecar.stop()  # the kubelet's SIGTERM once the sandbox has exited: the sidecar drains, the Job completes
        CHILDREN.discard(sidecar)


async def jobs_k(emulator: EmulatorProcess, k: int, preset: FleetPreset) -> dict[str, Any]:
    """2K items at once, served by Jobs that a controller creates as KEDA's ScaledJob (`accurate`) would."""
    environment_id = f"env_jobs_{k}"
    async with _scaler(emulator, environment_id, preset.stats_interval) as scaler:
        jobs: list[Job] = []
        tasks: list[asyncio.Task[None]] = []
        checks = 0
        async with grpc.aio.insecure_channel(scaler) as channel:
            stub = kpb_grpc.ExternalScalerStub(channel)
            ref = kpb.ScaledObjectRef(name="jobs", namespace="bench", scalerMetadata=METADATA)
            request = kpb.GetMetricsRequest(scaledObjectRef=ref, metricName="work-items")
            t0 = time.monotonic()
            ids = await emulator.enqueue(environment_id, 2 * k)
            deadline = t0 + 120 + 4 * preset.hold
            while time.monotonic() < deadline:
                answer = await stub.GetMetrics(request, timeout=5)
                checks += 1
                wanted = math.ceil(answer.metricValues[0].metricValueFloat / 1)
                pending = sum(1 for j in jobs if j.ready is None and j.ended is None)
                running = sum(1 for j in jobs if j.ready is not None and j.ended is None)
                capped = wanted + running > preset.job_max
                new = preset.job_max - running if capped else wanted - pending  # KEDA's `accurate` strategy
                for _ in range(max(new, 0)):
                    job = Job(len(jobs), created=time.monotonic())
                    jobs.append(job)
                    tasks.append(asyncio.ensure_future(_run_job(job, emulator, environment_id, preset)))
                items = await emulator.items(environment_id)
                done = {i["id"] for i in items if i["state"] == "stopped"} >= set(ids)
                if done and all(j.ended is not None for j in jobs):
                    break
                await asyncio.sleep(preset.job_polling)  # the controller's polling interval itself
        await asyncio.gather(*tasks, return_exceptions=True)
    idle = [j for j in jobs if not j.took_item]
    idle_seconds = [round((j.ended or 0.0) - (j.ready or j.created), 3) for j in idle]
    return {
        "k": k,
        "items": len(ids),
        "controller_checks": checks,
        "jobs_created": len(jobs),
        "jobs_with_an_item": len(jobs) - len(idle),
        "idle_jobs": len(idle),
        "idle_seconds": idle_seconds,
        "idle_seconds_max": max(idle_seconds, default=0.0),
        "idle_job_exit_codes": sorted({j.exit_code for j in idle if j.exit_code is not None}),
        "items_stopped": done,
        "seconds": round(time.monotonic() - t0, 2),
    }


# -- one-sandbox pods: idle cost and dispatch, sidecars vs SDK workers -----------------------------------------


async def _idle_and_phase(
    emulator: EmulatorProcess, environment_id: str, recorders: list[Any], preset: FleetPreset
) -> dict[str, Any]:
    await asyncio.sleep(2.0)  # settle into the idle rhythm
    seq = await emulator.next_seq()
    start = time.monotonic()
    await asyncio.sleep(preset.pod_idle_seconds)  # the measured window itself
    entries, _ = await emulator.requests(seq)
    window = time.monotonic() - start
    ops = count_operations(entries, environment_id)
    rng = random.Random(preset.seed + len(recorders))
    enqueued: dict[str, float] = {}
    for _ in range(preset.phase_items):
        await asyncio.sleep(rng.uniform(*preset.phase_gap))  # the arrival pattern itself
        at = time.monotonic()
        [work_id] = await emulator.enqueue(environment_id, 1)
        enqueued[work_id] = at
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not all(any(w in r.assigned for r in recorders) for w in enqueued):
        changes = [asyncio.ensure_future(r.changed.wait()) for r in recorders]
        for recorder in recorders:
            recorder.changed.clear()
        await asyncio.wait(changes, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
        for change in changes:
            change.cancel()
    latency = _latencies(enqueued, recorders)
    return {"idle_per_minute": sum(ops.values()) / window * 60, **latency}


async def pods_k(emulator: EmulatorProcess, k: int, preset: FleetPreset) -> dict[str, Any]:
    """K one-sandbox sidecars (no gap, then `pod_gap`) and K SDK workers, each on an environment of its own."""
    from .baseline import sdk_fleet

    out: dict[str, Any] = {"k": k}
    for name, extra in (("sidecar", []), ("sidecar_gap", ["--idle-poll-gap", str(preset.pod_gap)])):
        env = f"env_pods_{name}_{k}"
        async with _sidecars(emulator, env, k, extra) as targets:
            fleets = [Fleet(target, streams=1, max_in_flight=1, hold=0.0) for target in targets]
            await asyncio.gather(*(f.start() for f in fleets))
            try:
                out[name] = await _idle_and_phase(emulator, env, fleets, preset)
            finally:
                await asyncio.gather(*(f.close() for f in fleets), return_exceptions=True)
    env = f"env_pods_sdk_{k}"
    async with sdk_fleet(emulator.url, env, k) as workers:
        out["sdk"] = await _idle_and_phase(emulator, env, [workers], preset)
    return out


# -- report ---------------------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _load(meta: dict[str, Any]) -> str:
    """The machine's load average (1/5/15 min) at the start and end of the run, as far as recorded."""
    start, end = meta.get("loadavg_start"), meta.get("loadavg_end")
    if not start or not end:
        return "load average not recorded"
    return (
        f"load average (1/5/15 min) {' / '.join(f'{x:.2f}' for x in start)} at the start, "
        f"{' / '.join(f'{x:.2f}' for x in end)} at the end"
    )


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        f"Fleet run `{meta['preset']}` on {meta['date']} ({meta['cpus']} CPUs, "
        f"{meta.get('cpu_model', 'CPU not recorded')}; {_load(meta)}): K sidecar processes with one sandbox each, "
        f"`work-sidecar scaler` (stats every {meta['stats_interval']} s) and one emulator, all on that machine.",
        "",
        f"Commit `{meta.get('commit', 'unknown')}`{' (with uncommitted changes)' if meta.get('dirty') else ''}.",
        "",
        "| K | fleet idle requests/min | per sidecar | scaler stats/min | burst p50 / p99 (ms) "
        "| trickle dispatch p50 / p99 (ms) | max replicas asked | held by two at once |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        idle, burst, trickle = run["idle"], run["burst"], run["trickle"]
        lines.append(
            f"| {run['k']} | {idle['fleet_per_minute']:,.1f} | {idle['per_sidecar_per_minute']:,.1f} "
            f"| {idle['scaler_stats_per_minute']:,.1f} | {_ms(burst['p50_ms'])} / {_ms(burst['p99_ms'])} "
            f"| {_ms(trickle['p50_ms'])} / {_ms(trickle['p99_ms'])} | {run['scaler']['max_replicas']} "
            f"| {run['items_held_by_two_at_once']} |"
        )
    lines += [
        "",
        f"- Burst: 2K items at once, each held {meta['hold']} s: its latency includes waiting for a free sandbox.",
        f"- Trickle: {meta['trickle_items']} items {meta['trickle_gap']} s apart, each stopped at once: "
        "enqueue → WorkAssigned.",
        "- Replicas asked = ceil((depth + pending) / targetItemsPerReplica=1) from GetMetrics, sampled every "
        f"{meta['sample_every']} s (fleet_replicas.png, beside the sandboxes holding an item: running items are "
        "not in the metric, so a ScaledJob runs asked + busy, and a ScaledObject's HPA sizes to the backlog).",
    ]
    pods = results.get("pods") or []
    if pods:
        lines += [
            "",
            "One-sandbox pods: K sidecars (one sandbox each) vs K official SDK workers, each fleet on its own "
            "environment.",
            "",
            "| K | fleet idle requests/min: sidecar / sidecar with "
            f"`--idle-poll-gap {meta['pod_gap']:g}` / SDK | dispatch p50 / p99 (ms): sidecar "
            "| sidecar with gap | SDK |",
            "|---:|---:|---:|---:|---:|",
        ]
        for run in pods:
            a, b, c = run["sidecar"], run["sidecar_gap"], run["sdk"]
            lines.append(
                f"| {run['k']} | {a['idle_per_minute']:,.0f} / {b['idle_per_minute']:,.0f} / "
                f"{c['idle_per_minute']:,.0f} | {_ms(a['p50_ms'])} / {_ms(a['p99_ms'])} "
                f"| {_ms(b['p50_ms'])} / {_ms(b['p99_ms'])} | {_ms(c['p50_ms'])} / {_ms(c['p99_ms'])} |"
            )
        lines += [
            "",
            f"- Idle: the fleet's Work API requests over {meta['pod_idle_seconds']:g} s with nothing queued, per "
            f"minute. Dispatch: {meta['phase_items']} items, one at a time at gaps uniform in "
            f"{meta['phase_gap'][0]:g}-{meta['phase_gap'][1]:g} s (seed {meta['seed']}+K), each stopped at once: "
            "enqueue → WorkAssigned (sidecar) or the handler called (SDK), at random phase of their poll cycles.",
        ]
    jobs = results.get("jobs") or []
    if jobs:
        lines += [
            "",
            f"ScaledJob after a burst of 2K items: a controller as KEDA's `accurate` strategy every "
            f"{meta['job_polling']:g} s (maxReplicaCount {meta['job_max']}); each Job `work-sidecar serve` + "
            f"`exec --once --idle-exit {meta['job_idle_exit']:g}`, items held {meta['hold']:g} s.",
            "",
            "| K | items | Jobs created | Jobs with an item | idle Jobs (no item) | idle seconds each (max) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for run in jobs:
            each = ", ".join(f"{v:.1f}" for v in run["idle_seconds"]) or "-"
            lines.append(
                f"| {run['k']} | {run['items']} | {run['jobs_created']} | {run['jobs_with_an_item']} "
                f"| {run['idle_jobs']} | {each} ({run['idle_seconds_max']:.1f}) |"
            )
        lines += [
            "",
            "- Idle seconds: from the Job's pod serving to its exit; `--idle-exit` ends a Job that found no item "
            "(exit 0, the Job completes). Without it such a Job waits for an item for as long as it exists.",
        ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 1.0 + 2.2 * len(runs)), squeeze=False)
    colors = {"idle": "#e2e8f0", "burst": "#fed7aa", "trickle": "#bfdbfe"}
    for index, (ax, run) in enumerate(zip(axes[:, 0], runs, strict=True)):
        samples = run["scaler"]["samples"]
        for name, (a, b) in run["phases"].items():
            ax.axvspan(a, b, color=colors[name], label=name)
        ax.step([s["t"] for s in samples], [s["replicas"] for s in samples], where="post", color="#2b6cb0",
                label="replicas asked: ceil(waiting + pending)")  # fmt: skip
        ax.step([s["t"] for s in samples], [s["busy"] for s in samples], where="post", color="#c05621",
                linestyle=":", label="sandboxes holding an item")  # fmt: skip
        ax.axhline(run["k"], color="grey", linestyle="--", linewidth=0.8, label=f"sandboxes running (K={run['k']})")
        ax.set_ylabel("replicas")
        ax.set_title(f"K = {run['k']} sidecars", fontsize=9)
        if index == 0:
            ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.15), ncol=3, frameon=False)
    axes[-1, 0].set_xlabel("seconds")
    fig.suptitle("Replicas the scaler would ask for, over idle / burst / trickle", fontsize=10)
    fig.tight_layout()
    path = out / "fleet_replicas.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


async def run(preset: FleetPreset, out: Path) -> dict[str, Any]:
    import os

    started = time.monotonic()
    source = provenance()  # the code measured: recorded when the run starts
    load_start = [round(x, 2) for x in os.getloadavg()]
    emulator = await EmulatorProcess.start(default_ttl=60)
    try:
        runs = [await run_k(emulator, k, preset) for k in preset.ks]
        pods = [await pods_k(emulator, k, preset) for k in preset.ks]
        jobs = [await jobs_k(emulator, k, preset) for k in preset.job_ks]
    finally:
        await emulator.close()
    results = {
        "meta": {
            **asdict(preset),
            "preset": preset.name,
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "seconds": round(time.monotonic() - started, 1),
            "loadavg_start": load_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            **source,
        },
        "runs": runs,
        "pods": pods,
        "jobs": jobs,
    }
    write(results, out)
    return results


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "fleet.md").write_text(markdown(results))
    plot(results, out)
