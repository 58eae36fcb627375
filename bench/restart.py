"""`python -m bench.restart [--leases N] [--seconds S]`: what leases that survive a restart cost (issue #12).

1. Journal CPU cost, in process: N leases with TTL 60 are renewed every 30 s (N/30 renewals a second, spread
   evenly, in real time) through `Leases` with the journal observing, and the same without it; the difference in
   process CPU time is the journal's cost (its writes, the batched fsync in a thread, compaction).
2. Adoption time, real processes: an emulator process and `work-sidecar serve --state-dir` holding N leases for
   one WatchWork stream; `kill -9`; a new process on the same state dir. Measured from the new process's start:
   when it serves, and when the emulator has received the first renewal of every adopted lease (and how many of
   them passed the compare-and-swap).

Not part of CI timing: run it by hand; the figures go to stdout and `bench/results/restart.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc

from sidecar.core.engine._lease import Leases
from sidecar.core.persistence import Binding, Journal
from sidecar.core.persistence._tokens import TokenIssuer
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from sidecar.workapi import HeartbeatResult, Work, WorkData

from ._procs import CHILDREN, EmulatorProcess, SidecarProcess
from ._provenance import provenance

ENV = "env_restart_bench"
RESULTS = Path(__file__).resolve().parent / "results" / "restart.json"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _renewal_load(leases_count: int, seconds: float, journal: Journal | None) -> dict[str, float]:
    observers = [journal.observer] if journal is not None else []
    leases = Leases(observers, tokens=TokenIssuer.ephemeral())
    held = []
    for i in range(leases_count):
        work = Work(id=f"work_{i:032x}", environment_id=ENV, data=WorkData(type="session", id=f"sesn_{i}"),
                    state="active", metadata={})  # fmt: skip
        beat = HeartbeatResult(last_heartbeat="2026-01-01T00:00:00.000001Z", lease_extended=True, state="active",
                               ttl_seconds=60)  # fmt: skip
        held.append(leases.claim(work, beat, sent_at=time.monotonic(), ttl_seconds=60))
    sync = asyncio.ensure_future(journal.run()) if journal is not None else None
    per_second = leases_count / 30  # TTL 60: renewed every 30 s
    tick = 0.01
    started = time.monotonic()
    cpu = _cpu()
    done = 0
    n = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * per_second)
        while done < due:
            lease = held[done % leases_count]
            n += 1
            stamp = f"2026-01-01T00:{(n // 1_000_000) % 60:02d}:{(n // 1000) % 60:02d}.{n % 1_000_000:06d}Z"
            leases.renewed(
                lease,
                HeartbeatResult(last_heartbeat=stamp, lease_extended=True, state="active", ttl_seconds=60),
                sent_at=time.monotonic(),
            )
            done += 1
        await asyncio.sleep(tick)
    cpu = _cpu() - cpu
    if sync is not None:
        sync.cancel()
    return {"cpu_seconds": cpu, "renewals": done, "wall_seconds": time.monotonic() - started}


def _isolated_record_cost(journal: Journal, records: int = 20_000) -> float:
    """CPU µs per renewal record (encode + write), outside the event loop: the stable part of the figure."""
    leases = Leases([journal.observer], tokens=TokenIssuer.ephemeral())
    beat = HeartbeatResult(last_heartbeat="2026-01-01T00:00:00.000001Z", lease_extended=True, state="active",
                           ttl_seconds=60)  # fmt: skip
    held = []
    for i in range(1000):
        work = Work(id=f"work_iso_{i:028x}", environment_id=ENV, data=WorkData(type="session", id=f"s{i}"),
                    state="active", metadata={})  # fmt: skip
        held.append(leases.claim(work, beat, sent_at=time.monotonic(), ttl_seconds=60))
    started = time.process_time()
    for _ in range(records // len(held)):
        for lease in held:
            journal.observer.renewed(lease, beat)
        journal._flush()
    return 1e6 * (time.process_time() - started) / records


async def journal_cost(leases_count: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as state:
        baseline = await _renewal_load(leases_count, seconds, None)
        binding = Binding.of(environment_id=ENV, api_url="http://127.0.0.1:1", provider="anthropic", api_key="k")
        journal = Journal(state, binding)
        journal.open()
        with_journal = await _renewal_load(leases_count, seconds, journal)
        isolated = _isolated_record_cost(journal)
        size = journal.path.stat().st_size
        started = time.monotonic()
        await journal.compact()
        compaction = time.monotonic() - started
        stats = {"records": journal.records_written, "writes": journal.writes, "compactions": journal.compactions}
        journal.close()
    extra = with_journal["cpu_seconds"] - baseline["cpu_seconds"]
    return {
        "leases": leases_count,
        "ttl_seconds": 60,
        "renewals_per_second": round(leases_count / 30, 1),
        "seconds": seconds,
        "cpu_seconds_without_journal": round(baseline["cpu_seconds"], 3),
        "cpu_seconds_with_journal": round(with_journal["cpu_seconds"], 3),
        "journal_cpu_percent_of_one_core": round(100 * extra / with_journal["wall_seconds"], 2),
        "journal_cpu_us_per_renewal": round(1e6 * extra / max(1, with_journal["renewals"]), 1),
        "journal_us_per_record_isolated": round(isolated, 1),
        "journal_bytes_before_compaction": size,
        "compaction_seconds": round(compaction, 3),
        **stats,
    }


async def adoption_time(leases_count: int) -> dict[str, Any]:
    emulator = await EmulatorProcess.start(default_ttl=60)
    state_dir = CHILDREN.log_dir / "state"
    extra = ["--state-dir", str(state_dir), "--reattach-grace", "600", "--max-pollers", "8"]
    try:
        first = await SidecarProcess.start(emulator, ENV, ttl=60, extra=extra)
        async with grpc.aio.insecure_channel(first.target) as channel:
            stub = pb_grpc.WorkServiceStub(channel)
            call = stub.WatchWork(pb.WatchWorkRequest(max_in_flight=leases_count, sandbox_id="bench"))
            for offset in range(0, leases_count, 1000):
                await emulator.enqueue(ENV, min(1000, leases_count - offset))
            took = time.monotonic()
            assigned = 0
            async for event in call:
                if event.HasField("work_assigned"):
                    assigned += 1
                    if assigned == leases_count:
                        break
            took = time.monotonic() - took
            call.cancel()
        await asyncio.sleep(1.0)  # let the last renewals' records reach the journal
        held_before_kill = {item["id"] for item in await emulator.items(ENV) if item["state"] == "active"}
        first.child.popen.send_signal(signal.SIGKILL)
        first.child.popen.wait()
        CHILDREN.discard(first.child)
        first_log = first.child.log_path.rename(first.child.log_path.with_suffix(".first.log"))
        since = await emulator.next_seq()
        started = time.time()
        second = await SidecarProcess.start(emulator, ENV, ttl=60, extra=extra)
        serving = time.time() - started
        journaled = held_before_kill
        first_renewal: dict[str, tuple[float, int | None]] = {}
        deadline = time.monotonic() + 120
        cursor = since
        quiet_since = time.monotonic()
        while len(first_renewal) < len(journaled) and time.monotonic() < deadline:
            entries, cursor = await emulator.requests(cursor)
            for entry in entries:
                work_id = entry.work_id
                if (
                    entry.operation == "heartbeat"
                    and work_id is not None
                    and work_id in journaled
                    and work_id not in first_renewal
                ):
                    first_renewal[work_id] = (entry.at, entry.status)
                    quiet_since = time.monotonic()
            if time.monotonic() - quiet_since > 10:
                break
            await asyncio.sleep(0.2)
        lines = second.child.log_path.read_text().splitlines()
        first_lines = first_log.read_text().splitlines()
        ended_before_kill = sum(1 for line in first_lines if '"lease ended"' in line)
        adopted_line: dict[str, Any] = next((json.loads(line) for line in lines if "adopted the leases" in line), {})
        second.stop()
        times = sorted(at - started for at, _ in first_renewal.values())
        return {
            "leases": leases_count,
            "held_at_kill": len(journaled),
            "claim_phase_seconds": round(took, 2),
            "new_process_serving_seconds": round(serving, 3),
            "ended_before_kill": ended_before_kill,
            "adopted": adopted_line.get("leases"),
            "adopt_in_process_seconds": adopted_line.get("seconds"),
            "renewals_seen": len(first_renewal),
            "renewals_ok": sum(1 for _, status in first_renewal.values() if status == 200),
            "renewals_412": sum(1 for _, status in first_renewal.values() if status == 412),
            "first_renewal_sent_by_seconds": {
                "first": round(times[0], 3) if times else None,
                "p50": round(times[len(times) // 2], 3) if times else None,
                "all": round(times[-1], 3) if times else None,
            },
        }
    finally:
        await emulator.close()
        CHILDREN.kill_all()


def _measured_on() -> dict[str, Any]:
    """Where and when a part ran: the commit, the machine and its load average (1/5/15 min) when the part began."""
    return {
        **provenance(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if not args.skip_cost:
        where = _measured_on()
        results["journal_cost"] = {**await journal_cost(args.leases, args.seconds), "measured_on": where}
        print(json.dumps(results["journal_cost"], indent=2), flush=True)
    if not args.skip_adoption:
        where = _measured_on()
        results["adoption"] = {**await adoption_time(args.adoption_leases or args.leases), "measured_on": where}
        print(json.dumps(results["adoption"], indent=2), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.restart", description=__doc__)
    parser.add_argument("--leases", type=int, default=10_000)
    parser.add_argument("--adoption-leases", type=int, default=0, help="leases for the adoption run (default --leases)")
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each journal-cost run")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-adoption", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = asyncio.run(main_async(args))
    finally:
        CHILDREN.kill_all()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    RESULTS.write_text(json.dumps(previous | results, indent=2) + "\n")  # a part run alone keeps the other
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
