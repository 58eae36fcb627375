"""The protocol floor: a minimal client that does only poll → ack → claiming heartbeat, as fast as it can.

N loops (one per sandbox), each: long poll (block_ms 999) → ack → heartbeat(NO_HEARTBEAT) → "dispatched" → stop
(force, in the background). One aiohttp session, URLs and headers built inline, no retries, no validation, no
telemetry: what is left is the two round trips after the poll and the emulator's own time. Dispatch p50 of the
sidecar is compared with this one's (issue #13: within 2 ms at N = 1, 10, 100).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any
from urllib.parse import quote

import aiohttp

from sidecar.wire import ANTHROPIC, NO_HEARTBEAT

from ._procs import KEY
from ._record import Recorder, started


class FloorFleet(Recorder):
    def __init__(self, url: str, environment_id: str, loops: int) -> None:
        super().__init__()
        self.base = url + ANTHROPIC.work_path(environment_id)
        self.loops = loops
        self.headers = {"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}
        self.headers["anthropic-beta"] = ANTHROPIC.extra_headers["anthropic-beta"]
        self.headers["anthropic-worker-id"] = "bench-floor"
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=False)
        self._tasks = [asyncio.ensure_future(self._loop(self._session)) for _ in range(self.loops)]

    async def _loop(self, session: aiohttp.ClientSession) -> None:
        headers = self.headers
        expected = quote(NO_HEARTBEAT, safe="")
        while True:
            async with session.get(self.base + "/poll?block_ms=999", headers=headers) as answer:
                work: Any = json.loads(await answer.read()) if answer.status == 200 else None
            if not work:
                continue
            work_id = work["id"]
            async with session.post(f"{self.base}/{work_id}/ack", headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    continue
            url = f"{self.base}/{work_id}/heartbeat?expected_last_heartbeat={expected}&desired_ttl_seconds=60"
            async with session.post(url, headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    continue
            self.note_assigned(work_id)
            async with session.post(f"{self.base}/{work_id}/stop", headers=headers, json={"force": True}) as answer:
                await answer.read()
            self.note_stopped(work_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()


def floor_fleet(url: str, environment_id: str, loops: int) -> contextlib.AbstractAsyncContextManager[FloorFleet]:
    return started(FloorFleet(url, environment_id, loops))
