"""The lease journal: the file `DIR/leases.journal` of `--state-dir`, an append-only log of records (`_records`).

`Journal` owns the file, its state in memory (what a compaction writes) and the state dir's lock. Its listeners
(`_observers`) hand it records; it never changes a lease.

Writes: records are collected per event-loop iteration and written with one `write(2)` at the end of it (claims
and acks at once, before the token or the ack leaves the process), so a `kill -9`, an OOM kill or a container
restart loses nothing that was written. A background task (`run`) `fsync`s the file (off the event loop) at most
every `fsync_interval`: only a machine crash can lose that last interval. A renewal never waits for the disk. When
the log has grown to several times the live state it is compacted: the state is written to a new file (fsync, in
a thread), the records written meanwhile are appended to it too, then it atomically replaces the log.

A write or an fsync that fails (a full disk, an I/O error) turns the journal unwritable (`accepting` is False):
one line is logged, nothing more is appended to the file (a part of a record may be in it), the sidecar takes no
new work (the poller's intake, readiness NOT_SERVING) and keeps renewing the leases it holds, whose state is kept
in memory. `run` tries every `RETRY_INTERVAL` to write the whole state afresh (a compaction); once that succeeds
the journal accepts again.

Reading at start (`open`, with `_replay`): what parses is adopted; a journal that cannot be read (an I/O error, not
a regular file), cannot be attributed or belongs to another binding is reported in one line and moved aside; damage
is reported in one line. The item `secret` is never
written: a re-attaching sandbox already has it, and an item whose claim outcome is unknown at a crash is released,
not handed to a sandbox (it returns to the queue with its secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import (
    JOURNAL_FILE,
    StateDirError,
    fsync_dir,
    lock_state_dir,
    move_aside,
    prepare_state_dir,
    read_journal,
    remove_leftovers,
    write_all,
    write_file,
    write_new,
)
from ._observers import ClaimRecorder, LeaseRecorder
from ._records import Binding, acking_line, closed_line, ended_line, held_line, settled_line
from ._replay import MAX_TOMBSTONES, Recovered, replay

if TYPE_CHECKING:
    from ..engine._lease import Lease

log = logging.getLogger("sidecar.journal")

MIN_COMPACT_BYTES = 1 << 20
RETRY_INTERVAL = 1.0
"""Seconds between attempts to write the journal afresh while it cannot be written."""
COMPACT_FACTOR = 4


class Journal:
    """Records held leases in `state_dir`; `open()` at start returns what the predecessor left.

    `observer` (a `LeaseObserver`) and `intents` (the hand-over's `ClaimIntents`) feed it."""

    def __init__(self, state_dir: str | os.PathLike[str], binding: Binding, *, fsync_interval: float = 1.0) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / JOURNAL_FILE
        self._binding = binding
        self._header = binding.header()
        self._fsync_interval = fsync_interval
        self._fd: int | None = None
        self._lock_fd: int | None = None
        # What the file says, per work id (the encoded line): the state a compaction writes.
        self._live: dict[str, bytes] = {}
        self._ended: OrderedDict[str, bytes] = OrderedDict()
        self._acked: dict[str, bytes] = {}
        # Transitions since the last write: a lease (encoded at write time) or a ready line; last one wins.
        self._pending: dict[str, Lease | tuple[str, bytes]] = {}
        self._scheduled = False
        self._carry: list[bytes] | None = None
        self._size = 0
        self._dirty = False
        self._written = asyncio.Event()
        self._failing = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.records_written = 0
        self.writes = 0
        self.compactions = 0
        self.observer = LeaseRecorder(self)
        self.intents = ClaimRecorder(self)

    # -- start and stop -------------------------------------------------------------------------------

    def lock(self) -> None:
        """Create the state dir if needed and take its lock (released by `close` or the process's end). Raises
        StateDirError when another process holds it or the dir is unusable."""
        if self._lock_fd is None:
            self._lock_fd = lock_state_dir(prepare_state_dir(self.dir))
            remove_leftovers(self.dir)

    def open(self) -> Recovered:
        """Lock the state dir (unless `lock` did), read the predecessor's journal, and start a fresh (compacted)
        one from it, in the current format."""
        self.lock()
        recovered = self._read()
        try:
            self._rewrite()
        except OSError as exc:
            raise StateDirError(
                f"cannot write the lease journal in {self.dir} ({exc.strerror}): free space in the state dir or fix "
                "its permissions"
            ) from None
        return recovered

    def close(self, *, clean: bool = False) -> None:
        """Write what is pending, fsync, release the state dir. `clean`: the sidecar drained, so every release
        was sent (a successor does not send them again)."""
        if self._fd is not None:
            if clean:
                self._put("", ("C", closed_line()))
            self._flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _read(self) -> Recovered:
        try:
            data = read_journal(self.path)
        except OSError as exc:
            recovered = Recovered(refused=f"it cannot be read ({exc.strerror})", refused_as="unreadable")
            self._move_aside(recovered)
            return recovered
        if data is None:
            return Recovered()
        recovered = replay(data, self._binding, now=time.time())
        if recovered.refused is not None:
            self._move_aside(recovered)
            return recovered
        self._live = {lease.work_id: lease.line() for lease in recovered.leases}
        self._ended = OrderedDict((end.work_id, end.line()) for end in recovered.ended)
        self._acked = {work_id: acking_line(work_id) for work_id in recovered.acked}
        if recovered.damaged:
            log.warning(
                "the lease journal was damaged: adopting what could be read; the rest is left to the Work API's TTL",
                extra={
                    "path": str(self.path),
                    "torn": recovered.torn,
                    "corrupt": recovered.corrupt,
                    "invalid": recovered.invalid,
                },
            )
        return recovered

    def _move_aside(self, recovered: Recovered) -> None:
        """Report a journal that is not adopted, in one line, and move it aside (it is replaced by a fresh one all
        the same: never adopted, never a crash loop)."""
        error = None
        try:
            recovered.moved_to = str(move_aside(self.path, recovered.refused_as))
        except OSError as exc:
            error = exc.strerror or str(exc)
        log.error(
            "the lease journal in the state dir was not adopted; moved aside"
            if error is None
            else "the lease journal in the state dir was not adopted, and could not be moved aside",
            extra={
                "reason": recovered.refused,
                "path": str(self.path),
                "moved_to": recovered.moved_to,
                "error": error,
                "environment_id": self._binding.environment_id,
            },
        )

    def _rewrite(self) -> None:
        """Start the log afresh with the current state (atomically replacing the old one)."""
        fd = write_new(self.path, self._snapshot())
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _snapshot(self) -> bytes:
        return b"".join([self._header, *self._live.values(), *self._ended.values(), *self._acked.values()])

    # -- the background task: fsync, compaction, recovery -------------------------------------------------

    async def run(self) -> None:
        """fsync what was written, at most every `fsync_interval`; an idle journal never wakes up. While the
        journal cannot be written, try every `RETRY_INTERVAL` to write it afresh from the state in memory."""
        while True:
            if not self._failing:
                await self._written.wait()
                await asyncio.sleep(self._fsync_interval)
                self._written.clear()
                await self.sync()
            if self._failing:
                await asyncio.sleep(RETRY_INTERVAL)
                await self.compact()
                continue
            state = len(self._header) + sum(map(len, self._live.values())) + sum(map(len, self._ended.values()))
            if self._size > max(MIN_COMPACT_BYTES, COMPACT_FACTOR * state):
                await self.compact()

    @property
    def accepting(self) -> bool:
        """Whether the journal can be written: while it cannot, the sidecar takes no new work."""
        return not self._failing

    async def wait_accepting(self) -> None:
        await self._writable.wait()

    async def sync(self) -> None:
        fd = self._fd
        if fd is None or not self._dirty or self._failing:
            return
        self._dirty = False
        try:
            await asyncio.to_thread(os.fsync, fd)
        except OSError as exc:
            self._fail(exc)

    async def compact(self) -> None:
        """Replace the log by the current state; records written meanwhile go to both files. It is also how a
        journal that could not be written recovers: a file written afresh holds everything, however the failed
        writes left the old one."""
        if self._fd is None:
            return
        self._flush()
        snapshot = self._snapshot()
        self._carry = []
        tmp = self.path.with_name(f".{JOURNAL_FILE}.compact")
        try:
            fd = await asyncio.to_thread(write_file, tmp, snapshot)
        except OSError as exc:
            self._carry = None
            self._compaction_failed(exc)
            return
        # From here to the swap nothing awaits: no record can slip between the two files.
        self._flush()
        carry, self._carry = self._carry, None
        try:
            for chunk in carry:
                write_all(fd, chunk)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            self._compaction_failed(exc)
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        self._size = len(snapshot) + sum(map(len, carry))
        self._dirty = True
        self.compactions += 1
        if self._failing:
            self._failing = False
            self._writable.set()
            log.warning("the lease journal can be written again: taking new work", extra={"path": str(self.path)})
        with contextlib.suppress(OSError):
            await asyncio.to_thread(fsync_dir, self.dir)

    def _compaction_failed(self, exc: OSError) -> None:
        if not self._failing:  # while failing, `_fail` said it once
            log.warning("compacting the lease journal failed; appending on", extra={"error": exc.strerror or str(exc)})

    def _fail(self, exc: OSError) -> None:
        """A write or fsync failed: take no new work until the journal is written afresh (`run` retries)."""
        if self._failing:
            return
        self._failing = True
        self._writable.clear()
        self._written.set()  # wakes `run`, which retries
        log.error(
            "the lease journal cannot be written: taking no new work until it can; the leases held are renewed",
            extra={"path": str(self.path), "error": exc.strerror or str(exc)},
        )

    # -- recording (the listeners in `_observers` call these) ------------------------------------------

    def record_lease(self, lease: Lease, *, at_once: bool = False) -> None:
        """The lease's current state (encoded when written: the latest wins)."""
        self._put(lease.work_id, lease, now=at_once)

    def record_end(self, lease: Lease) -> None:
        self._put(lease.work_id, ("E", ended_line(lease)))

    def record_acking(self, work_id: str) -> None:
        """The item is about to be acked: written at once, before the ack leaves the process."""
        self._put(work_id, ("A", acking_line(work_id)), now=True)

    def record_settled(self, work_id: str) -> None:
        """The claim of an acked item is over without a lease; nothing to write when a lease settled it."""
        pending = self._pending.get(work_id)
        intended = work_id in self._acked or (isinstance(pending, tuple) and pending[0] == "A")
        if intended and work_id not in self._live and not (pending is not None and not isinstance(pending, tuple)):
            self._put(work_id, ("S", settled_line(work_id)))

    # -- writing ----------------------------------------------------------------------------------------

    def _put(self, work_id: str, entry: Lease | tuple[str, bytes], *, now: bool = False) -> None:
        self._pending.pop(work_id, None)  # re-insert: the latest transition is written last
        self._pending[work_id] = entry
        if now:
            self._flush()
            return
        if not self._scheduled:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:
                self._flush()
                return
            self._scheduled = True

    def _record(self, work_id: str, entry: Lease | tuple[str, bytes]) -> bytes | None:
        """The line for one pending entry (an (op, line) pair, or a live lease), with the in-memory state updated
        as that line will leave it; None for a lease that ended meanwhile (its end record follows)."""
        if not isinstance(entry, tuple):
            if entry.ended:
                return None
            line = held_line(entry)
            self._live[work_id] = line
            self._acked.pop(work_id, None)
            self._ended.pop(work_id, None)
            return line
        op, line = entry
        if op == "E":
            self._live.pop(work_id, None)
            self._acked.pop(work_id, None)
            self._ended.pop(work_id, None)
            self._ended[work_id] = line
            while len(self._ended) > MAX_TOMBSTONES:
                self._ended.popitem(last=False)
        elif op == "A":
            self._acked[work_id] = line
        elif op == "S":
            self._acked.pop(work_id, None)
        return line

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending or self._fd is None:
            return
        pending, self._pending = self._pending, {}
        lines: list[bytes] = []
        for work_id, entry in pending.items():
            line = self._record(work_id, entry)
            if line is not None:
                lines.append(line)
        chunk = b"".join(lines)
        if self._carry is not None:
            self._carry.append(chunk)
        if self._failing:
            return  # the state in memory has it: `compact` writes it all afresh once it can
        try:
            write_all(self._fd, chunk)
        except OSError as exc:
            self._fail(exc)  # a part of the chunk may be in the file: nothing more is appended to it
            return
        self._size += len(chunk)
        self._dirty = True
        self._written.set()
        self.records_written += len(lines)
        self.writes += 1
