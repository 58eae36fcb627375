"""SDK workers as separate processes (issue #13 compares the sidecar with "10 SDK worker processes").

`SdkProcesses(url, env, n)` starts min(n, MAX_PROCESSES) processes (`python -m bench.sdk_procs URL ENV HOLD W`),
n `BenchWorker`s (see baseline.py) spread evenly over them (so 100 workers are 10 processes of 10: a hundred
Python processes would not even start on 2 cores). A process reports "ready" once imported and its workers and
their clients are built, and starts its workers when the harness writes "go" (so every worker starts at once, after
the items are queued); it writes one line per event
(`a ID` dispatched, `s ID` stopped, `l ID` lost, `e` a stop error), which the harness turns into the Recorder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from ._record import Recorder, started

MAX_PROCESSES = 10


class SdkProcesses(Recorder):
    def __init__(self, url: str, environment_id: str, workers: int, hold: float = 0.0) -> None:
        super().__init__()
        self.argv = [sys.executable, "-m", "bench.sdk_procs", url, environment_id, str(hold)]
        self.workers = workers
        self.processes = min(workers, MAX_PROCESSES)
        self._procs: list[asyncio.subprocess.Process] = []
        self._readers: list[asyncio.Task[None]] = []

    async def prepare(self) -> None:
        """Start the processes and wait until each is ready (they poll nothing yet)."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for index in range(self.processes):
            mine = self.workers // self.processes + (index < self.workers % self.processes)
            proc = await asyncio.create_subprocess_exec(
                *self.argv, str(mine), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env
            )
            self._procs.append(proc)
        for proc in self._procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 180)
            if line.strip() != b"ready":
                raise RuntimeError(f"an SDK worker process did not start: {line!r}")

    async def start(self) -> None:
        if not self._procs:
            await self.prepare()
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        for proc in self._procs:
            assert proc.stdin is not None
            await proc.stdin.drain()
            self._readers.append(asyncio.ensure_future(self._read(proc)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            kind, _, work_id = line.decode().strip().partition(" ")
            if kind == "a":
                self.note_assigned(work_id)
            elif kind == "s":
                self.note_stopped(work_id)
            elif kind == "l":
                self.note_lost(work_id)
            elif kind == "e":
                self.stop_errors += 1

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        for proc in self._procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    async def close(self) -> None:
        for proc in self._procs:  # EOF on stdin: the worker stops and removes its workdir
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
        for proc in self._procs:
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)


def sdk_processes(
    url: str, environment_id: str, workers: int, hold: float = 0.0
) -> contextlib.AbstractAsyncContextManager[SdkProcesses]:
    return started(SdkProcesses(url, environment_id, workers, hold))


# -- the child ------------------------------------------------------------------------------------------------


class _Reporting(Recorder):
    """The child's recorder: every event is a line on stdout."""

    def __init__(self, hold: float) -> None:
        super().__init__()
        self.hold = hold

    def note_assigned(self, work_id: str) -> None:
        sys.stdout.write(f"a {work_id}\n")

    def note_stopped(self, work_id: str) -> None:
        sys.stdout.write(f"s {work_id}\n")

    def note_lost(self, work_id: str) -> None:
        sys.stdout.write(f"l {work_id}\n")


async def _child(url: str, environment_id: str, hold: float, workers: int) -> None:
    from .baseline import SdkFleet

    fleet = SdkFleet(url, environment_id, workers, hold)
    reporter = _Reporting(hold)
    # The fleet's recorder methods report through stdout instead.
    fleet.note_assigned = reporter.note_assigned  # type: ignore[method-assign]
    fleet.note_stopped = reporter.note_stopped  # type: ignore[method-assign]
    fleet.note_lost = reporter.note_lost  # type: ignore[method-assign]
    fleet.prepare()  # the workers and their clients exist before "ready": the harness's clock starts at "go"
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, sys.stdin.readline):  # EOF before "go": never started
        await fleet.close()
        return
    await fleet.start()
    await loop.run_in_executor(None, sys.stdin.readline)  # EOF or a line: stop
    await fleet.close()


if __name__ == "__main__":
    asyncio.run(_child(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
