"""`make run`: the whole flow in one command.

Starts `work-sidecar serve` on the embedded Work API emulator, enqueues a few demo items through the
emulator's admin API, runs the example sandbox until it has stopped them, then prints grpcurl commands
to try against the still-running sidecar (Ctrl-C drains and stops it). With --once it exits instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sidecar.emulator import AdminClient

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


async def enqueue(emulator: str, environment_id: str, count: int) -> list[dict[str, Any]]:
    async with AdminClient(emulator) as admin:
        return await admin.enqueue(environment_id, count)


def banner(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"\n==> {text}", flush=True)


def wait_healthy(target: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the sidecar exited with status {proc.returncode}")
        result = subprocess.run(
            [str(BIN / "work-sidecar"), "health", "--sidecar", target, "--timeout", "1"],
            capture_output=True,
            check=False,
        )
        if result.returncode == 0:
            return
        time.sleep(0.2)  # polling a condition with a deadline
    raise SystemExit("the sidecar did not become healthy in time")


def grpcurl_command() -> str:
    """How to type grpcurl from the repo root: the virtualenv's (`make run` installs it), else the one on PATH."""
    local = BIN / "grpcurl"
    if local.exists():
        with contextlib.suppress(ValueError):
            return str(local.relative_to(Path.cwd()))
        return str(local)
    return shutil.which("grpcurl") or "grpcurl"


def exit_status(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"status {returncode}"


def stop_process(proc: subprocess.Popen[bytes], name: str, timeout: float) -> None:
    """SIGTERM `proc` (its own process group) once and wait; a second Ctrl-C or the timeout kills it."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {timeout:.0f} s: killing it", file=sys.stderr, flush=True)
        proc.kill()
        proc.wait()
    except KeyboardInterrupt:
        print(f"second Ctrl-C: killing {name}", file=sys.stderr, flush=True)
        proc.kill()
        proc.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the demo items are done")
    parser.add_argument("--items", type=int, default=3, help="demo work items to queue (default 3)")
    parser.add_argument("--socket", default="/tmp/work-sidecar.sock", help="the sidecar's Unix socket path")
    parser.add_argument("--tcp", default="127.0.0.1:50051", help="the sidecar's TCP address")
    parser.add_argument("--emulator-port", type=int, default=8787, help="port of the embedded Work API emulator")
    args = parser.parse_args(argv)
    # The children run in their own process groups, so a Ctrl-C at the terminal reaches this process only: it
    # drains the sidecar with exactly one SIGTERM (the sandbox sees Draining and finishes its items). SIGTERM
    # (a supervisor, `timeout`, `kill`) and SIGHUP (the terminal closed) end in the same `finally`. SIGINT is
    # restored too, for shells that start background jobs ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))

    unix = f"unix://{args.socket}"
    banner("starting work-sidecar on the embedded Work API emulator")
    env = {**os.environ, "WORK_SIDECAR_LOG_FORMAT": os.environ.get("WORK_SIDECAR_LOG_FORMAT", "text")}
    sidecar = subprocess.Popen(
        [
            str(BIN / "work-sidecar"), "serve",
            "--listen", unix, "--listen", args.tcp,
            "--emulator-port", str(args.emulator_port),
            "--drain-timeout", "5",
        ],
        env=env,
        process_group=0,
    )  # fmt: skip
    sandbox: subprocess.Popen[bytes] | None = None
    interrupted = False
    try:
        wait_healthy(unix, sidecar, time.monotonic() + 30)
        emulator = f"http://127.0.0.1:{args.emulator_port}"
        banner(f"enqueueing {args.items} demo work items (POST {emulator}/_emulator/environments/env_local/work)")
        for item in asyncio.run(enqueue(emulator, "env_local", args.items)):
            print(f"  queued {item['id']} (session {item['data']['id']})")
        banner("running the example sandbox (examples/python/sandbox.py)")
        sandbox = subprocess.Popen(
            [sys.executable, str(ROOT / "examples/python/sandbox.py"), "--sidecar", unix, "--items", str(args.items)],
            process_group=0,
        )
        if sandbox.wait() != 0 or sidecar.poll() is not None:
            return sidecar_died(sidecar) if sidecar.poll() is not None else sandbox_failed(sandbox)
        grpcurl = grpcurl_command()
        banner("the sidecar is still running; try it with grpcurl (reflection is on; docs/getting-started.md):")
        print(
            f"  {grpcurl} -plaintext {args.tcp} list\n"
            f"  {grpcurl} -plaintext {args.tcp} describe sidecar.work.v1.WorkService\n"
            f"  {grpcurl} -plaintext {args.tcp} grpc.health.v1.Health/Check\n"
            f"  {grpcurl} -plaintext -emit-defaults {args.tcp} sidecar.work.v1.WorkService/GetQueueStats\n"
            f"  # WatchWork blocks, printing each event: run it in a second terminal, then queue an item here\n"
            f"  {grpcurl} -plaintext -d '{{\"max_in_flight\":1}}' {args.tcp} sidecar.work.v1.WorkService/WatchWork\n"
            f"  curl -s -XPOST {emulator}/_emulator/environments/env_local/work -d '{{\"count\":1}}'"
        )
        if args.once:
            return 0
        print("\nCtrl-C to drain and stop the sidecar.", flush=True)
        sidecar.wait()
        return sidecar_died(sidecar)
    except KeyboardInterrupt:
        interrupted = True
        banner("Ctrl-C: draining the sidecar (a running sandbox finishes its items first)")
        return 0
    finally:
        if sidecar.poll() is None:
            stop_process(sidecar, "the sidecar", timeout=15)  # one SIGTERM: a clean drain
            if interrupted:
                print(f"the sidecar drained and exited ({exit_status(sidecar.returncode)})", flush=True)
        if sandbox is not None and sandbox.poll() is None:
            stop_process(sandbox, "the sandbox", timeout=15)


def sidecar_died(sidecar: subprocess.Popen[bytes]) -> int:
    print(
        f"\nwork-sidecar exited unexpectedly ({exit_status(sidecar.returncode)}); its log is above. "
        "Run make run again to restart the demo.",
        file=sys.stderr,
        flush=True,
    )
    return 1


def sandbox_failed(sandbox: subprocess.Popen[bytes]) -> int:
    print(f"\nthe example sandbox failed ({exit_status(sandbox.returncode)}); its output is above.", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
