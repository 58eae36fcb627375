"""`make run`: the whole flow in one command.

Starts `work-sidecar serve` on the embedded Work API emulator, enqueues a few demo items through the
emulator's admin API, runs the example sandbox until it has stopped them, then prints grpcurl commands
to try against the still-running sidecar (Ctrl-C drains and stops it). With --once it exits instead.
"""

from __future__ import annotations

import argparse
import asyncio
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the demo items are done")
    parser.add_argument("--items", type=int, default=3)
    parser.add_argument("--socket", default="/tmp/work-sidecar-demo.sock")
    parser.add_argument("--tcp", default="127.0.0.1:50051")
    parser.add_argument("--emulator-port", type=int, default=8787)
    args = parser.parse_args(argv)
    # Ctrl-C, and SIGTERM (a supervisor, `timeout`, `kill`), both end in the `finally` below, which drains the
    # sidecar: never leave it running. SIGINT is restored too, for shells that start background jobs ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

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
    )  # fmt: skip
    try:
        wait_healthy(unix, sidecar, time.monotonic() + 30)
        emulator = f"http://127.0.0.1:{args.emulator_port}"
        banner(f"enqueueing {args.items} demo work items (POST {emulator}/_emulator/environments/env_local/work)")
        for item in asyncio.run(enqueue(emulator, "env_local", args.items)):
            print(f"  queued {item['id']} (session {item['data']['id']})")
        banner("running the example sandbox (examples/python/sandbox.py)")
        subprocess.run(
            [sys.executable, str(ROOT / "examples/python/sandbox.py"), "--sidecar", unix, "--items", str(args.items)],
            check=True,
        )
        grpcurl = shutil.which("grpcurl") or "grpcurl"
        banner("the sidecar is still running; try it with grpcurl (reflection is on):")
        print(
            f"  {grpcurl} -plaintext {args.tcp} list\n"
            f"  {grpcurl} -plaintext {args.tcp} describe sidecar.work.v1.WorkService\n"
            f"  {grpcurl} -plaintext {args.tcp} grpc.health.v1.Health/Check\n"
            f"  {grpcurl} -plaintext {args.tcp} sidecar.work.v1.WorkService/GetQueueStats\n"
            f"  curl -s -XPOST {emulator}/_emulator/environments/env_local/work -d '{{\"count\":1}}'\n"
            f"  {grpcurl} -plaintext -d '{{\"max_in_flight\":1}}' {args.tcp} sidecar.work.v1.WorkService/WatchWork"
        )
        if args.once:
            return 0
        print("\nCtrl-C to drain and stop the sidecar.", flush=True)
        sidecar.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if sidecar.poll() is None:
            sidecar.send_signal(signal.SIGTERM)
            try:
                sidecar.wait(timeout=15)
            except subprocess.TimeoutExpired:
                sidecar.kill()


if __name__ == "__main__":
    sys.exit(main())
