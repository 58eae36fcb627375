"""The baseline: the official SDK's worker (`anthropic.lib.environments.EnvironmentWorker`), one per sandbox.

Each worker runs the SDK's own `EnvironmentWorker.run()`: its poll loop (`aiter_work`: long poll, ack, jittered
sleeps when idle) and, per item, its own lease loop (`_heartbeat_loop`: compare-and-swap heartbeats every
clamp(ttl/2, 1, 30) s) and its force-stop on exit. Only the body of the item changes: where the SDK would fetch
the session and run its tool runner (the emulator has no sessions API), the bench handler notes the time it was
called (dispatch), waits for the lease's first heartbeat (so one item costs the same lifecycle as with the
sidecar: poll, ack, claiming heartbeat, stop), holds the item for `hold` seconds and returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from typing import Any

import anthropic
import anyio
from anthropic.lib._scoped_client import _copy_client_with_bearer_auth
from anthropic.lib.environments import EnvironmentWorker
from anthropic.lib.environments._poller import _is_status
from anthropic.lib.environments._worker import (
    _heartbeat_loop,
    _Lease,
    _LeaseEndReason,
    _sessions_token_from_secret,
)

from ._procs import KEY
from ._record import Recorder, started


class BenchWorker(EnvironmentWorker):
    """`EnvironmentWorker` with the session runner replaced by the bench handler (see the module docstring)."""

    def __init__(self, client: anthropic.AsyncAnthropic, recorder: SdkFleet, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._recorder = recorder

    async def _handle_item(self, work_item: Any, environment_key: str | None, lease: _Lease | None = None) -> None:
        # As EnvironmentWorker._handle_item in anthropic 2.10.0, minus the session fetch and the tool runner.
        recorder = self._recorder
        recorder.note_assigned(work_item.id)
        credential = _sessions_token_from_secret(getattr(work_item, "secret", None)) or environment_key
        assert credential is not None
        worker_client = _copy_client_with_bearer_auth(self._client, auth_token=credential, helper="environments-worker")
        work_res = worker_client.beta.environments.work
        lease = lease or _Lease()
        claimed = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:

                async def heartbeat() -> None:
                    try:
                        await _heartbeat_loop(
                            work_res,
                            work_id=work_item.id,
                            environment_id=work_item.environment_id,
                            lease=lease,
                            extra_headers=self._extra_headers,
                            on_lease_ttl=lambda _ttl: claimed.set(),
                        )
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(heartbeat)
                await claimed.wait()
                if recorder.hold:
                    await anyio.sleep(recorder.hold)
                lease.finish(_LeaseEndReason.RUNNER_DONE)
                tg.cancel_scope.cancel()
        finally:
            if lease.lost:
                recorder.note_lost(work_item.id)
            else:
                with anyio.CancelScope(shield=True):
                    try:
                        await work_res.stop(
                            work_item.id,
                            environment_id=work_item.environment_id,
                            force=True,
                            extra_headers=self._extra_headers,
                        )
                    except anthropic.APIError as exc:  # the SDK's base error: status, connection and timeout
                        if not _is_status(exc, 409):
                            recorder.stop_errors += 1
                recorder.note_stopped(work_item.id)


class SdkFleet(Recorder):
    """`workers` SDK workers as asyncio tasks in this process, each with its own client (connection pool)."""

    def __init__(self, url: str, environment_id: str, workers: int, hold: float = 0.0) -> None:
        super().__init__()
        self.url = url
        self.environment_id = environment_id
        self.workers = workers
        self.hold = hold
        self._clients: list[anthropic.AsyncAnthropic] = []
        self._workers: list[BenchWorker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._workdir = tempfile.mkdtemp(prefix="work-sidecar-bench-sdk-")

    def prepare(self) -> None:
        """Build every worker and its client (each makes an HTTP client and a TLS context: start-up work, not
        throughput)."""
        for index in range(len(self._workers), self.workers):
            client = anthropic.AsyncAnthropic(api_key="unused", base_url=self.url)
            self._clients.append(client)
            self._workers.append(
                BenchWorker(
                    client,
                    self,
                    environment_id=self.environment_id,
                    environment_key=KEY,
                    workdir=self._workdir,
                    worker_id=f"bench-sdk-{index}",
                    memory_sync_interval=None,
                )
            )

    async def start(self) -> None:
        self.prepare()
        self._tasks = [asyncio.ensure_future(worker.run()) for worker in self._workers]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.close()
        shutil.rmtree(self._workdir, ignore_errors=True)


def sdk_fleet(
    url: str, environment_id: str, workers: int, hold: float = 0.0
) -> contextlib.AbstractAsyncContextManager[SdkFleet]:
    return started(SdkFleet(url, environment_id, workers, hold))
