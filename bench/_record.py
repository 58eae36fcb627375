"""What both sides record per item, so every figure reads them the same way."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

R = TypeVar("R", bound="Recorder")


class Recorder:
    """One side's sandboxes (sidecar fleet or SDK workers): `start` them, `close` them, record what they see."""

    async def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def __init__(self) -> None:
        self.assigned: dict[str, float] = {}
        """work id → time.monotonic() when the sandbox got it (sidecar: WorkAssigned; SDK: the handler ran)."""
        self.assigned_wall: dict[str, float] = {}
        """work id → time.time() at the same moment (to line up with the emulator's request log)."""
        self.stopped: dict[str, float] = {}
        """work id → time.monotonic() when its stop answered."""
        self.lost_ids: set[str] = set()
        """Items whose lease was lost (sidecar: LeaseLost; SDK: its heartbeat loop gave the lease up)."""
        self.stop_errors = 0
        self.changed = asyncio.Event()

    def note_assigned(self, work_id: str) -> None:
        self.assigned[work_id] = time.monotonic()
        self.assigned_wall[work_id] = time.time()
        self.changed.set()

    def note_stopped(self, work_id: str) -> None:
        self.stopped[work_id] = time.monotonic()
        self.changed.set()

    @property
    def lost(self) -> int:
        return len(self.lost_ids)

    def note_lost(self, work_id: str) -> None:
        self.lost_ids.add(work_id)
        self.changed.set()

    async def wait(self, condition: Callable[[], bool], within: float) -> bool:
        """Wait until `condition()` is true (re-checked on every event); False on timeout."""
        deadline = time.monotonic() + within
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True


@contextlib.asynccontextmanager
async def started(side: R) -> AsyncIterator[R]:
    """`side` started for the `async with` block, and closed after it (also when starting it failed)."""
    try:
        await side.start()
        yield side
    finally:
        await side.close()
