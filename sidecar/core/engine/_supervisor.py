"""Every background task of the core runs here: nothing dies silently.

- `spawn(coro, name=…, on_crash=…)`: a one-shot task (a renewal, a release, a hand-over). An unexpected
  exception is logged once, with its traceback, and `on_crash` runs (the owner fences the lease it concerned).
  `run(coro, …)` does the same in the caller's own task.
- `keep(factory, name=…)`: a loop that must run until it returns by itself (the poll loop, the renewal
  scheduler). If it raises, it is logged and started again after a capped exponential backoff. A loop that crashed
  `crash_limit` times within `crash_window` seconds counts as dead: `alive` turns False (liveness fails, so
  the orchestrator restarts the process), while the supervisor keeps restarting it.

Cancellation (close, drain) is not a crash.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

from ._policy import Backoff

log = logging.getLogger("sidecar.supervisor")

Crash = Callable[[BaseException], None]


class Supervisor:
    def __init__(self, *, backoff: Backoff | None = None, crash_limit: int = 5, crash_window: float = 60.0) -> None:
        self._backoff = backoff or Backoff(initial=0.2, maximum=10.0)
        self._crash_limit = crash_limit
        self._crash_window = crash_window
        self._tasks: set[asyncio.Task[None]] = set()
        self._crashes: dict[str, deque[float]] = {}
        self.crashed = 0
        """Unexpected exceptions seen so far (one-shot tasks and loops)."""
        self._closed = False

    # -- one-shot tasks -----------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, None], *, name: str, on_crash: Crash | None = None) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._guard(coro, name, on_crash))
        if self._closed:  # a timer that fired during close: the work is not started (the task ends cancelled)
            task.cancel()
            return task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self, coro: Coroutine[Any, Any, None], *, name: str, on_crash: Crash | None = None) -> None:
        """`coro` in the caller's task, guarded as `spawn`'s tasks are: it never raises but CancelledError."""
        await self._guard(coro, name, on_crash)

    async def _guard(self, coro: Coroutine[Any, Any, None], name: str, on_crash: Crash | None) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.crashed += 1
            log.exception("background task failed", extra={"task": name, "error": type(exc).__name__})
            if on_crash is not None:
                try:
                    on_crash(exc)
                except Exception:
                    log.exception("crash handler failed", extra={"task": name})

    # -- loops that must always run -----------------------------------------------------------------

    def keep(self, factory: Callable[[], Coroutine[Any, Any, None]], *, name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._forever(factory, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _forever(self, factory: Callable[[], Coroutine[Any, Any, None]], name: str) -> None:
        failures = 0
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.crashed += 1
                log.exception("loop failed; restarting it", extra={"task": name, "error": type(exc).__name__})
            now = time.monotonic()
            crashes = self._crashes.setdefault(name, deque(maxlen=self._crash_limit))
            crashes.append(now)
            failures = 1 if now - started > self._crash_window else failures + 1
            await asyncio.sleep(self._backoff.delay(failures))

    @property
    def alive(self) -> bool:
        """False once some loop crashed `crash_limit` times within `crash_window` seconds."""
        now = time.monotonic()
        return not any(
            len(crashes) == self._crash_limit and now - crashes[0] <= self._crash_window
            for crashes in self._crashes.values()
        )

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
