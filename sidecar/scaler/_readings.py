"""One cached reading per environment, shared by every KEDA call and every ScaledObject.

A reader exists per environment while KEDA asks about it: a background loop reads `GET …/work/stats`
every `stats_interval` seconds (one request, whatever the number of callers), doubles the wait after
each failure up to `max_backoff` (or waits what a 429 asked for), and stops once nobody has called or
streamed for `linger` seconds. Callers never trigger a read: they take the latest reading, or wait for
the first one. A reading older than `max_age` (reads keep failing) is not served: the caller gets the
last Work API error instead, so KEDA's `fallback` can take over.

Items in progress (acknowledged or leased) are not in the stats: while a trigger of the environment asks
for them (`includeInProgress`), each read also lists the environment's items and counts those in progress.
A count that fails (or needs more than `max_list_pages` pages) fails only the calls that need it, like a
failed read: they get the last count while it is younger than `max_age`, then the error.

An environment whose first read fails (unknown, forbidden, or the API down) keeps no reader: its error is
remembered for one `stats_interval` (so repeated calls cost no further request) and its slot is free at once.
Only environments that have been read hold one of the `max_environments` slots, so environments the scaler
cannot read never starve the ones it can.

The scaler never polls, acks or heartbeats: it takes no items.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..workapi import NotFoundError, QueueStats, RateLimitError, WorkApiClient, WorkApiError
from . import _telemetry

log = logging.getLogger("sidecar.scaler")

IN_PROGRESS_STATES = frozenset({"starting", "active", "stopping"})
"""Work states between the ack and the end of the lease: an item in one of them occupies a worker."""


@dataclass(frozen=True, slots=True)
class Reading:
    stats: QueueStats
    at: float
    """time.monotonic() of the answer."""
    in_progress: int | None = None
    """Items acknowledged or leased (listed and counted); None when this read did not count them."""

    @property
    def waiting(self) -> int:
        """Items that need a replica: waiting (`depth`) plus polled but not yet acknowledged (`pending`)."""
        return self.stats.depth + self.stats.pending

    def items(self, include_in_progress: bool = False) -> int:
        """The metric: waiting items, plus the ones in progress when asked."""
        if include_in_progress:
            assert self.in_progress is not None, "a reading with the in-progress count was asked for"
            return self.waiting + self.in_progress
        return self.waiting


class StaleReading(Exception):
    """No reading young enough, and no Work API error to report (reads are still being attempted)."""


class TooManyItems(WorkApiError):
    """Counting items in progress would list more pages than `max_list_pages`."""

    def __init__(self, pages: int) -> None:
        super().__init__(
            f"counting items in progress needs more than {pages} list pages: raise --max-list-pages",
            operation="list",
        )


class ReaderEvicted(WorkApiError):
    """The environment's first read was abandoned to free its slot for another environment."""

    def __init__(self) -> None:
        super().__init__(
            "too many environments are being read for the first time at once: this one was set aside; retry",
            operation="stats",
        )


class EnvironmentReader:
    def __init__(
        self,
        client: WorkApiClient,
        *,
        interval: float,
        max_backoff: float,
        max_age: float,
        linger: float,
        max_list_pages: int,
        page_size: int | None = None,
        on_idle: Callable[[EnvironmentReader], None] | None = None,
        on_unreadable: Callable[[EnvironmentReader, WorkApiError], None] | None = None,
    ) -> None:
        self.client = client
        self.environment_id = client.environment_id
        self.interval = interval
        self.max_backoff = max_backoff
        self.max_age = max_age
        self.linger = linger
        self.max_list_pages = max_list_pages
        self.page_size = page_size
        self.reading: Reading | None = None
        """The latest successful read."""
        self.counted: Reading | None = None
        """The latest successful read that counted the items in progress."""
        self.error: WorkApiError | None = None
        """The error of the latest read when its stats failed."""
        self.count_error: WorkApiError | None = None
        """The error of the latest count of items in progress when only that failed."""
        self.reads = 0
        self.last_demand = time.monotonic()
        self._generation = 0
        self._changed = asyncio.Condition()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._streams = 0
        self._in_progress_demand = -float("inf")
        self._in_progress_streams = 0
        self._on_idle = on_idle
        self._on_unreadable = on_unreadable

    # -- the loop ----------------------------------------------------------------------------------

    def _ensure_running(self, in_progress: bool) -> None:
        now = time.monotonic()
        self.last_demand = now
        if in_progress:
            self._in_progress_demand = now
            latest = self.reading
            failing = self.error is not None or self.count_error is not None  # then the backoff decides
            if not failing and latest is not None and latest.in_progress is None:
                self._wake.set()  # the count is wanted now: read at once rather than after the interval
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._loop())

    def _idle(self) -> bool:
        return self._streams == 0 and time.monotonic() - self.last_demand > self.linger

    def _wants_in_progress(self) -> bool:
        return self._in_progress_streams > 0 or time.monotonic() - self._in_progress_demand <= self.linger

    async def _read(self) -> tuple[Reading, WorkApiError | None]:
        """The stats (raises when they fail) and, when wanted, the count of items in progress (its error is
        returned: a failed count leaves the stats reading to the calls that do not need the count)."""
        with _telemetry.read_span(self.environment_id) as span:
            stats = await self.client.stats()
            span.set_attribute("work.queue.waiting", stats.depth + stats.pending)
            in_progress: int | None = None
            count_error: WorkApiError | None = None
            if self._wants_in_progress():
                try:
                    in_progress = await self._count_in_progress()
                except WorkApiError as exc:
                    count_error = exc
                else:
                    span.set_attribute("work.queue.in_progress", in_progress)
            return Reading(stats, time.monotonic(), in_progress), count_error

    async def _count_in_progress(self) -> int:
        count = pages = 0
        cursor: str | None = None
        while True:
            if pages >= self.max_list_pages:
                raise TooManyItems(self.max_list_pages)
            page = await self.client.list_page(limit=self.page_size, cursor=cursor)
            pages += 1
            count += sum(1 for item in page.data if item.state in IN_PROGRESS_STATES)
            cursor = page.next_cursor
            if cursor is None:
                return count

    async def _loop(self) -> None:
        failures = 0
        while True:
            delay = self.interval
            self._wake.clear()
            failed: WorkApiError | None
            try:
                reading, failed = await self._read()
            except WorkApiError as exc:
                failed = self.error = exc
            else:
                self.error = None
                self.reading = reading
                self.count_error = failed
                if reading.in_progress is not None:
                    self.counted = reading
            if failed is None:
                failures = 0
            else:
                failures += 1
                _telemetry.read_failed(failed)
                delay = min(self.interval * 2**failures, self.max_backoff) * random.uniform(0.8, 1.0)
                if isinstance(failed, RateLimitError) and failed.retry_after is not None:
                    delay = max(delay, min(failed.retry_after, self.max_backoff))
                # An environment the API does not know, never read: the caller hears NOT_FOUND; any client may
                # name such environments by the thousand, so it is not a warning for the operator.
                unknown = self.reading is None and isinstance(failed, NotFoundError)
                log.log(
                    logging.INFO if unknown else logging.WARNING,
                    "stats read failed" if self.error is not None else "count of items in progress failed",
                    extra={"environment_id": self.environment_id, "error": str(failed), "retry_in": round(delay, 2)},
                )
            self.reads += 1
            async with self._changed:
                self._generation += 1
                self._changed.notify_all()
            if self.reading is None and self.error is not None and self._on_unreadable is not None:
                self._on_unreadable(self, self.error)  # never read: give the slot back (callers saw the error)
                return
            if self._idle():
                log.info("no more demand: stopped reading", extra={"environment_id": self.environment_id})
                if self._on_idle is not None:
                    self._on_idle(self)
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- what callers see --------------------------------------------------------------------------

    def _fresh(self, in_progress: bool) -> Reading | None:
        reading = self.counted if in_progress else self.reading
        if reading is None or time.monotonic() - reading.at > self.max_age:
            return None
        return reading

    def _failure(self, in_progress: bool) -> WorkApiError | None:
        """What the latest read reports to a caller that has no fresh reading."""
        return self.error or (self.count_error if in_progress else None)

    async def current(self, wait: float, *, in_progress: bool = False) -> Reading:
        """The latest reading young enough to serve (with the in-progress count when asked); waits (up to
        `wait` seconds) for the first one. Raises the last WorkApiError, or StaleReading, when there is none."""
        self._ensure_running(in_progress)
        deadline = time.monotonic() + wait
        while True:
            fresh = self._fresh(in_progress)
            if fresh is not None:
                return fresh
            failure = self._failure(in_progress)
            if failure is not None:  # the latest read failed and there is no reading young enough
                raise failure.with_traceback(None)  # raised again and again: no growing traceback
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StaleReading(self.environment_id)
            await self._wait_change(remaining)

    async def _wait_change(self, wait: float) -> None:
        async with self._changed:
            seen = self._generation
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._changed.wait_for(lambda: self._generation != seen)

    async def updates(self, *, in_progress: bool = False) -> AsyncIterator[Reading | WorkApiError]:
        """Every new reading (or failed read) from now on, for a stream; the reader keeps going meanwhile."""
        self._streams += 1
        self._in_progress_streams += in_progress
        seen = self._generation
        try:
            while True:
                self._ensure_running(in_progress)
                async with self._changed:
                    await self._changed.wait_for(lambda: self._generation != seen)  # noqa: B023 (used at once)
                    seen = self._generation
                fresh = self._fresh(in_progress)
                failure = self._failure(in_progress)
                if fresh is not None:
                    yield fresh
                elif failure is not None:
                    yield failure
        finally:
            self._streams -= 1
            self._in_progress_streams -= in_progress
            self.last_demand = time.monotonic()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()

    async def abandon(self) -> None:
        """Stop reading, and answer whoever still waits for the first reading with ReaderEvicted."""
        await self.close()
        if self.reading is None and self.error is None:
            self.error = ReaderEvicted()
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()


class Readings:
    """The readers, one per environment that has been read (at most `max_environments`), created on demand.

    An environment whose first read failed is in `_unreadable` (its error, until one interval has passed): a
    call for it gets that error without a new request, and it holds no slot. That memory is bounded too: the
    oldest entries go first.
    """

    def __init__(
        self,
        make_client: Callable[[str], WorkApiClient],
        *,
        max_environments: int,
        interval: float,
        max_backoff: float,
        max_age: float,
        linger: float,
        max_list_pages: int,
        page_size: int | None = None,
    ) -> None:
        self._make_client = make_client
        self._max = max_environments
        self._interval = interval
        self._reader_options = {"interval": interval, "max_backoff": max_backoff, "max_age": max_age, "linger": linger}
        self._max_list_pages = max_list_pages
        self._page_size = page_size
        self._readers: dict[str, EnvironmentReader] = {}
        self._unreadable: OrderedDict[str, tuple[WorkApiError, float]] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._readers)

    def readers(self) -> list[EnvironmentReader]:
        return list(self._readers.values())

    def get(self, environment_id: str) -> EnvironmentReader:
        """The environment's reader; raises the error of a recent failed first read, or OverflowError when
        every slot is held by an environment that has been read."""
        reader = self._readers.get(environment_id)
        if reader is not None:
            return reader
        refused = self._unreadable.get(environment_id)
        if refused is not None:
            error, until = refused
            if time.monotonic() < until:
                raise error.with_traceback(None)
            del self._unreadable[environment_id]
        if len(self._readers) >= self._max and not self._evict_one_never_read():
            raise OverflowError(f"the scaler already reads {self._max} environments")
        reader = EnvironmentReader(
            self._make_client(environment_id),
            max_list_pages=self._max_list_pages,
            page_size=self._page_size,
            on_idle=self._forget,
            on_unreadable=self._refuse,
            **self._reader_options,
        )
        self._readers[environment_id] = reader
        return reader

    def _evict_one_never_read(self) -> bool:
        """Free the slot of the least recently asked-for environment that has no reading yet (its first read
        is still in flight); False when every slot holds an environment that has been read."""
        unread = [r for r in self._readers.values() if r.reading is None]
        if not unread:
            return False
        victim = min(unread, key=lambda r: r.last_demand)
        del self._readers[victim.environment_id]
        task = asyncio.ensure_future(victim.abandon())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        return True

    def _refuse(self, reader: EnvironmentReader, error: WorkApiError) -> None:
        self._forget(reader)
        self._unreadable[reader.environment_id] = (error.with_traceback(None), time.monotonic() + self._interval)
        self._unreadable.move_to_end(reader.environment_id)
        while len(self._unreadable) > 16 * self._max:
            self._unreadable.popitem(last=False)

    def _forget(self, reader: EnvironmentReader) -> None:
        if self._readers.get(reader.environment_id) is reader:
            del self._readers[reader.environment_id]
            task = asyncio.ensure_future(reader.client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        readers, self._readers = list(self._readers.values()), {}
        await asyncio.gather(*(reader.close() for reader in readers), *self._closing, return_exceptions=True)
