"""One cached stats reading per environment, shared by every KEDA call and every ScaledObject.

A reader exists per environment while KEDA asks about it: a background loop reads `GET …/work/stats`
every `stats_interval` seconds (one request, whatever the number of callers), doubles the wait after
each failure up to `max_backoff` (or waits what a 429 asked for), and stops once nobody has called or
streamed for `linger` seconds. Callers never trigger a read: they take the latest reading, or wait for
the first one. A reading older than `max_age` (reads keep failing) is not served: the caller gets the
last Work API error instead, so KEDA's `fallback` can take over.

The scaler never polls, acks or heartbeats: it takes no items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..workapi import QueueStats, RateLimitError, WorkApiClient, WorkApiError

log = logging.getLogger("sidecar.scaler")


@dataclass(frozen=True, slots=True)
class Reading:
    stats: QueueStats
    at: float
    """time.monotonic() of the answer."""

    @property
    def items(self) -> int:
        """Items that need a replica: waiting (`depth`) plus polled but not yet acknowledged (`pending`)."""
        return self.stats.depth + self.stats.pending


class StaleReading(Exception):
    """No reading young enough, and no Work API error to report (reads are still being attempted)."""


class EnvironmentReader:
    def __init__(
        self,
        client: WorkApiClient,
        *,
        interval: float,
        max_backoff: float,
        max_age: float,
        linger: float,
        on_idle: Callable[[EnvironmentReader], None] | None = None,
    ) -> None:
        self.client = client
        self.environment_id = client.environment_id
        self.interval = interval
        self.max_backoff = max_backoff
        self.max_age = max_age
        self.linger = linger
        self.reading: Reading | None = None
        self.error: WorkApiError | None = None
        self.reads = 0
        self._generation = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._last_demand = time.monotonic()
        self._streams = 0
        self._on_idle = on_idle

    # -- the loop ----------------------------------------------------------------------------------

    def _ensure_running(self) -> None:
        self._last_demand = time.monotonic()
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())

    def _idle(self) -> bool:
        return self._streams == 0 and time.monotonic() - self._last_demand > self.linger

    async def _loop(self) -> None:
        failures = 0
        while True:
            delay = self.interval
            try:
                stats = await self.client.stats()
            except WorkApiError as exc:
                failures += 1
                self.error = exc
                delay = min(self.interval * 2**failures, self.max_backoff) * random.uniform(0.8, 1.0)
                if isinstance(exc, RateLimitError) and exc.retry_after is not None:
                    delay = max(delay, min(exc.retry_after, self.max_backoff))
                log.warning(
                    "stats read failed",
                    extra={"environment_id": self.environment_id, "error": str(exc), "retry_in": round(delay, 2)},
                )
            else:
                failures = 0
                self.error = None
                self.reading = Reading(stats, time.monotonic())
            self.reads += 1
            async with self._changed:
                self._generation += 1
                self._changed.notify_all()
            if self._idle():
                log.info("no more demand: stopped reading", extra={"environment_id": self.environment_id})
                if self._on_idle is not None:
                    self._on_idle(self)
                return
            await asyncio.sleep(delay)

    # -- what callers see --------------------------------------------------------------------------

    def _fresh(self) -> Reading | None:
        reading = self.reading
        if reading is not None and time.monotonic() - reading.at <= self.max_age:
            return reading
        return None

    async def current(self, wait: float) -> Reading:
        """The latest reading young enough to serve; waits (up to `wait` seconds) for the first one.
        Raises the last WorkApiError, or StaleReading, when there is none."""
        self._ensure_running()
        deadline = time.monotonic() + wait
        while True:
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            if self.error is not None:  # the latest read failed and there is no reading young enough
                raise self.error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self.error is not None:
                    raise self.error
                raise StaleReading(self.environment_id)
            await self._wait_change(remaining)

    async def _wait_change(self, wait: float) -> None:
        async with self._changed:
            seen = self._generation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait_for(lambda: self._generation != seen)

    async def updates(self) -> AsyncIterator[Reading | WorkApiError]:
        """Every new reading (or failed read) from now on, for a stream; the reader keeps going meanwhile."""
        self._streams += 1
        seen = self._generation
        try:
            while True:
                self._ensure_running()
                async with self._changed:
                    await self._changed.wait_for(lambda: self._generation != seen)  # noqa: B023 (used at once)
                    seen = self._generation
                fresh = self._fresh()
                if fresh is not None:
                    yield fresh
                elif self.error is not None:
                    yield self.error
        finally:
            self._streams -= 1
            self._last_demand = time.monotonic()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()


class Readings:
    """The readers, one per environment, created on first demand (at most `max_environments`)."""

    def __init__(self, make_client: Callable[[str], WorkApiClient], *, max_environments: int, **reader: float) -> None:
        self._make_client = make_client
        self._max = max_environments
        self._reader_options = reader
        self._readers: dict[str, EnvironmentReader] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._readers)

    def get(self, environment_id: str) -> EnvironmentReader:
        reader = self._readers.get(environment_id)
        if reader is None:
            if len(self._readers) >= self._max:
                raise OverflowError(f"the scaler already reads {self._max} environments")
            reader = EnvironmentReader(self._make_client(environment_id), on_idle=self._forget, **self._reader_options)
            self._readers[environment_id] = reader
        return reader

    def _forget(self, reader: EnvironmentReader) -> None:
        if self._readers.get(reader.environment_id) is reader:
            del self._readers[reader.environment_id]
            task = asyncio.ensure_future(reader.client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        await asyncio.gather(*(reader.close() for reader in readers), return_exceptions=True)
