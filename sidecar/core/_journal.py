"""The lease journal: what a restarted sidecar needs to continue the leases a crashed one held (`--state-dir`).

It is a `LeaseObserver` (and the hand-over's `ClaimIntents`): it hears every transition and never changes a
lease. The file `DIR/leases.journal` is an append-only log of one-line records:

    <crc32 of the JSON, 8 hex digits> <JSON object>\\n

- a header first: format version, environment, API URL, provider and a hash of the API key (the journal of
  another environment, API URL or key is refused: moved aside, not adopted);
- `L` the full state of a held lease: work id, item data, the last `last_heartbeat` (the CAS value), TTL,
  expiry (wall clock), sandbox id, stop state and the token's nonce (never the token, never the `secret`);
- `E` a lease ended (with its reason: kept as a tombstone so a sandbox re-attaching later learns how);
- `A` an item is about to be acked; `S` its claim settled without a lease (a later `L` settles it too);
- `C` the sidecar drained and closed the journal cleanly (its releases were sent).

The last record of a work id wins. Writes: records are collected per event-loop iteration and written with one
`write(2)` at the end of it (claims and acks at once, before the token or the ack leaves the process), so a
`kill -9`, an OOM kill or a container restart loses nothing that was written. A background task `fsync`s the
file (off the event loop) at most every `fsync_interval`: only a machine crash can lose that last interval.
A renewal never waits for the disk. When the log has grown to several times the live state it is compacted:
the state is written to a new file (fsync, in a thread), the records written meanwhile are appended to it too,
then it atomically replaces the log.

Reading at start: a torn last line (a crash mid-write) or a corrupt line (bad checksum, bad JSON) is reported
and skipped; everything that parses is adopted; the rest is left to the Work API's TTL. A file without a
readable header cannot be attributed to an environment: it is reported, moved aside and not adopted.
The item `secret` is never written: a re-attaching sandbox already has it, and an item whose claim outcome is
unknown at a crash is released, not handed to a sandbox (it returns to the queue with its secret).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..work.v1 import work_service_pb2 as pb

if TYPE_CHECKING:
    from ..workapi import HeartbeatResult
    from ._lease import Lease

log = logging.getLogger("sidecar.journal")

FORMAT = 1
JOURNAL_FILE = "leases.journal"
LOCK_FILE = "lock"
MAX_TOMBSTONES = 10_000
TOMBSTONE_MAX_AGE = 3600.0
"""Ended leases are remembered across restarts for this long (s), at most MAX_TOMBSTONES of them."""
MIN_COMPACT_BYTES = 1 << 20
RETRY_INTERVAL = 1.0
"""Seconds between attempts to write the journal afresh while it cannot be written."""
COMPACT_FACTOR = 4


class StateDirError(RuntimeError):
    """The state dir cannot be used (another sidecar holds it, or it is not writable)."""


@dataclass(frozen=True, slots=True)
class Binding:
    """What a journal belongs to. The API key only as a hash."""

    environment_id: str
    api_url: str
    provider: str
    key_hash: str = field(repr=False)

    @classmethod
    def of(cls, *, environment_id: str, api_url: str, provider: str, api_key: str) -> Binding:
        digest = hashlib.sha256(b"work-sidecar journal\0" + api_key.encode()).hexdigest()[:32]
        return cls(environment_id, api_url.rstrip("/"), provider, digest)

    def header(self) -> dict[str, Any]:
        return {
            "op": "H",
            "format": FORMAT,
            "environment_id": self.environment_id,
            "api_url": self.api_url,
            "provider": self.provider,
            "key": self.key_hash,
        }

    def mismatch(self, header: dict[str, Any]) -> str | None:
        """Which binding differs ('environment', 'API URL', …), or None when the header is ours."""
        if header.get("format") != FORMAT:
            return f"format {header.get('format')!r}"
        for name, key, ours in (
            ("environment", "environment_id", self.environment_id),
            ("API URL", "api_url", self.api_url),
            ("provider", "provider", self.provider),
            ("API key", "key", self.key_hash),
        ):
            if header.get(key) != ours:
                return name
        return None


@dataclass(frozen=True, slots=True)
class JournaledLease:
    work_id: str
    data_type: str
    data_id: str
    last_heartbeat: str = field(repr=False)
    ttl_seconds: int
    expires_at: float
    """Wall-clock expiry (epoch seconds) after the last successful heartbeat."""
    nonce: str = field(repr=False)
    sandbox_id: str
    state: int
    stop_notified: bool


@dataclass(frozen=True, slots=True)
class JournaledEnd:
    work_id: str
    data_type: str
    data_id: str
    nonce: str = field(repr=False)
    state: int
    reason: int
    last_heartbeat: str = field(repr=False)
    expires_at: float
    ended_at: float


@dataclass(slots=True)
class Recovered:
    """What the predecessor's journal says, as far as it could be read."""

    leases: list[JournaledLease] = field(default_factory=list)
    ended: list[JournaledEnd] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    """Items acked (or about to be) whose claim never settled."""
    torn: int = 0
    corrupt: int = 0
    invalid: int = 0
    """Records that check out but hold impossible values (a non-finite expiry, a negative TTL, a bad id): skipped."""
    refused: str | None = None
    """Why the journal was not adopted at all (it was moved aside), or None."""
    clean: bool = False
    """The predecessor drained and closed the journal (nothing after): its releases were all sent."""
    moved_to: str | None = None


def encode(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one line (without its newline), or None when it does not check out."""
    crc, sep, payload = line.partition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("op"), str) else None


def _lease_record(lease: Lease) -> bytes:
    return encode(
        {
            "op": "L",
            "work": lease.work_id,
            "type": lease.work.data.type,
            "data_id": lease.work.data.id,
            "hb": lease.last_heartbeat,
            "ttl": lease.ttl_seconds,
            "exp": round(lease.expires_at.timestamp(), 3),
            "nonce": lease.nonce,
            "sandbox": lease.sandbox_id,
            "state": lease.state,
            "told": lease.stop_notified,
        }
    )


def _end_record(lease: Lease) -> bytes:
    return encode(
        {
            "op": "E",
            "work": lease.work_id,
            "type": lease.work.data.type,
            "data_id": lease.work.data.id,
            "nonce": lease.nonce,
            "state": lease.state,
            "reason": lease.lost_reason,
            "hb": lease.last_heartbeat,
            "exp": round(lease.expires_at.timestamp(), 3),
            "at": round(time.time(), 3),
        }
    )


class Journal:
    """Records held leases in `state_dir`; `open()` at start returns what the predecessor left."""

    def __init__(self, state_dir: str | os.PathLike[str], binding: Binding, *, fsync_interval: float = 1.0) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / JOURNAL_FILE
        self._binding = binding
        self._header = encode(binding.header())
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

    # -- start and stop -------------------------------------------------------------------------------

    def open(self) -> Recovered:
        """Lock the state dir (unless `lock` did), read the predecessor's journal, and start a fresh (compacted)
        one from it."""
        if self._lock_fd is None:
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
                self._put("", ("C", encode({"op": "C", "work": "", "at": round(time.time(), 3)})))
            self._flush()
            with contextlib.suppress(OSError):
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def lock(self) -> None:
        """Create the state dir if needed and take its lock (`flock`, released by `close` or the process's end).
        Raises StateDirError when another process holds it or the dir is unusable."""
        prepare_state_dir(self.dir)
        try:
            fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateDirError(f"cannot lock the state dir {self.dir} ({exc.strerror}): check --state-dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StateDirError(
                f"another work-sidecar process uses the state dir {self.dir}: give each sidecar its own"
            ) from None
        self._lock_fd = fd

    def _read(self) -> Recovered:
        recovered = Recovered()
        lines = self._lines(recovered)
        if lines is None:
            return recovered
        if not lines:  # not even a header: written by no sidecar (a file is always replaced whole with its header)
            return self._move_aside(recovered, "corrupt", "it has no complete line, so it cannot be attributed")
        header = decode(lines[0])
        if header is None or header.get("op") != "H":
            return self._move_aside(recovered, "corrupt", "its header is unreadable, so it cannot be attributed")
        mismatch = self._binding.mismatch(header)
        if mismatch is not None:
            return self._move_aside(recovered, "refused", f"it was written for another {mismatch}")
        live, ended, acked = _replay(lines[1:], recovered)
        self._adopt_live(live, recovered)
        self._adopt_ended(ended, recovered)
        recovered.acked = list(acked)
        self._acked = acked
        if recovered.torn or recovered.corrupt or recovered.invalid:
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

    def _lines(self, recovered: Recovered) -> list[bytes] | None:
        """The journal's complete lines (a torn last one is counted and dropped); None when there is no journal."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateDirError(f"cannot read the lease journal {self.path} ({exc.strerror}): move it away") from None
        lines = data.split(b"\n")
        if lines[-1]:
            recovered.torn = 1  # the last record was being written when the process died
        lines.pop()
        return lines

    def _adopt_live(self, live: dict[str, tuple[bytes, dict[str, Any]]], recovered: Recovered) -> None:
        for work_id, (raw, record) in live.items():
            lease = _journaled_lease(record)
            if lease is None:
                recovered.invalid += 1
                continue
            recovered.leases.append(lease)
            self._live[work_id] = raw

    def _adopt_ended(self, ended: OrderedDict[str, tuple[bytes, dict[str, Any]]], recovered: Recovered) -> None:
        now = time.time()
        for work_id, (raw, record) in list(ended.items())[-MAX_TOMBSTONES:]:
            end = _journaled_end(record)
            if end is None:
                recovered.invalid += 1
                continue
            if now - end.ended_at > TOMBSTONE_MAX_AGE:
                continue
            recovered.ended.append(end)
            self._ended[work_id] = raw

    def _move_aside(self, recovered: Recovered, kind: str, why: str) -> Recovered:
        target = self.path.with_name(f"{JOURNAL_FILE}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, target)
        except OSError as exc:  # it is replaced by a fresh journal all the same: never adopted, never a crash loop
            log.error("the lease journal could not be moved aside", extra={"path": str(self.path), "error": str(exc)})
        recovered.refused = why
        recovered.moved_to = str(target)
        log.error(
            "the lease journal in the state dir was not adopted; moved aside",
            extra={
                "reason": why,
                "path": str(self.path),
                "moved_to": str(target),
                "environment_id": self._binding.environment_id,
            },
        )
        return recovered

    def _rewrite(self) -> None:
        """Start the log afresh with the current state (atomically replacing the old one)."""
        fd = _write_new(self.path, self._snapshot())
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def _snapshot(self) -> bytes:
        return b"".join([self._header, *self._live.values(), *self._ended.values(), *self._acked.values()])

    # -- the background task: fsync, compaction ----------------------------------------------------------

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
            fd = await asyncio.to_thread(_write_file, tmp, snapshot)
        except OSError as exc:
            self._carry = None
            if not self._failing:
                log.warning("compacting the lease journal failed; appending on", extra={"error": str(exc)})
            return
        # From here to the swap nothing awaits: no record can slip between the two files.
        self._flush()
        carry, self._carry = self._carry, None
        try:
            for chunk in carry:
                _write_all(fd, chunk)
            os.replace(tmp, self.path)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if not self._failing:
                log.warning("compacting the lease journal failed; appending on", extra={"error": str(exc)})
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
            await asyncio.to_thread(_fsync_dir, self.dir)

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
            line: bytes = _lease_record(entry)
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
            _write_all(self._fd, chunk)
        except OSError as exc:
            self._fail(exc)  # a part of the chunk may be in the file: nothing more is appended to it
            return
        self._size += len(chunk)
        self._dirty = True
        self._written.set()
        self.records_written += len(lines)
        self.writes += 1

    # -- ClaimIntents (the hand-over) ---------------------------------------------------------------------

    def acking(self, work_id: str) -> None:
        """The item is about to be acked: written before the ack leaves the process."""
        self._put(work_id, ("A", encode({"op": "A", "work": work_id, "at": round(time.time(), 3)})), now=True)

    def settled(self, work_id: str) -> None:
        """The claim is over without a lease (the item is not ours, or it was released). A lease made by the
        claim settles it by itself."""
        pending = self._pending.get(work_id)
        intended = work_id in self._acked or (isinstance(pending, tuple) and pending[0] == "A")
        if intended and work_id not in self._live and not (pending is not None and not isinstance(pending, tuple)):
            self._put(work_id, ("S", encode({"op": "S", "work": work_id})))

    # -- LeaseObserver ------------------------------------------------------------------------------------

    def claimed(self, lease: Lease) -> None:
        # A fresh claim is written at once: its token is about to reach a sandbox.
        self._put(lease.work_id, lease, now=not lease.adopted)

    def assigned(self, lease: Lease) -> None:
        self._put(lease.work_id, lease)

    def renewed(self, lease: Lease, result: HeartbeatResult) -> None:
        self._put(lease.work_id, lease)

    def stop_requested(self, lease: Lease) -> None:
        self._put(lease.work_id, lease)

    def ended(self, lease: Lease) -> None:
        self._put(lease.work_id, ("E", _end_record(lease)))


_Records = dict[str, tuple[bytes, dict[str, Any]]]


def _replay(
    lines: list[bytes], recovered: Recovered
) -> tuple[_Records, OrderedDict[str, tuple[bytes, dict[str, Any]]], dict[str, bytes]]:
    """Replay the records after the header: the last record of a work id wins. (live, ended, acked-unsettled)."""
    live: _Records = {}
    ended: OrderedDict[str, tuple[bytes, dict[str, Any]]] = OrderedDict()
    acked: dict[str, bytes] = {}
    for line in lines:
        record = decode(line)
        if record is not None and record["op"] == "C":
            recovered.clean = True
            continue
        work_id = record.get("work") if record is not None else None
        if record is None or not isinstance(work_id, str) or not work_id:
            recovered.corrupt += 1
            continue
        recovered.clean = False
        raw = line + b"\n"
        op = record["op"]
        if op not in ("L", "E", "A", "S") or not _ID.fullmatch(work_id):
            recovered.invalid += 1
            continue
        if op != "A":
            acked.pop(work_id, None)
        if op == "L":
            live[work_id] = (raw, record)
            ended.pop(work_id, None)
        elif op == "E":
            live.pop(work_id, None)
            ended.pop(work_id, None)
            ended[work_id] = (raw, record)
        elif op == "A":
            acked[work_id] = raw
    return live, ended, acked


class _Impossible(ValueError):
    """A record that checks out (checksum, JSON) but holds values no sidecar writes."""


_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,256}")
_HELD_STATES = frozenset({pb.LEASE_STATE_ACTIVE, pb.LEASE_STATE_STOP_REQUESTED})
_ENDED_STATES = frozenset({pb.LEASE_STATE_LOST, pb.LEASE_STATE_STOPPED})
_REASONS = frozenset(pb.LeaseLostReason.values())
_MAX_EPOCH = 253402300799.0
"""The last second of year 9999: the largest expiry a `datetime` holds."""


def _text(record: dict[str, Any], key: str, pattern: re.Pattern[str] | None, *, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str) or (pattern is not None and value and not pattern.fullmatch(value)):
        raise _Impossible(key)
    return value


def _number(record: dict[str, Any], key: str, *, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _MAX_EPOCH:
        raise _Impossible(key)  # NaN and infinities fail the range check too
    return float(value)


def _choice(record: dict[str, Any], key: str, allowed: frozenset[int], *, default: int | None = None) -> int:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise _Impossible(key)
    return value


def _journaled_lease(record: dict[str, Any]) -> JournaledLease | None:
    """The lease of an `L` record, or None when a value is missing or impossible."""
    try:
        ttl = record.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl < 2**31:
            raise _Impossible("ttl")
        told = record.get("told", False)
        if not isinstance(told, bool):
            raise _Impossible("told")
        work_id = _text(record, "work", _ID)
        nonce = _text(record, "nonce", _NONCE)
        last_heartbeat = _text(record, "hb", _PRINTABLE)
        if not (work_id and nonce and last_heartbeat):
            raise _Impossible("work")
        return JournaledLease(
            work_id=work_id,
            data_type=_text(record, "type", _PRINTABLE, default=""),
            data_id=_text(record, "data_id", _PRINTABLE, default=""),
            last_heartbeat=last_heartbeat,
            ttl_seconds=ttl,
            expires_at=_number(record, "exp"),
            nonce=nonce,
            sandbox_id=_text(record, "sandbox", _PRINTABLE, default=""),
            state=_choice(record, "state", _HELD_STATES, default=pb.LEASE_STATE_ACTIVE),
            stop_notified=told,
        )
    except _Impossible:
        return None


def _journaled_end(record: dict[str, Any]) -> JournaledEnd | None:
    """The end of an `E` record, or None when a value is missing or impossible."""
    try:
        work_id = _text(record, "work", _ID)
        nonce = _text(record, "nonce", _NONCE)
        if not (work_id and nonce):
            raise _Impossible("work")
        return JournaledEnd(
            work_id=work_id,
            data_type=_text(record, "type", _PRINTABLE, default=""),
            data_id=_text(record, "data_id", _PRINTABLE, default=""),
            nonce=nonce,
            state=_choice(record, "state", _ENDED_STATES),
            reason=_choice(record, "reason", _REASONS, default=pb.LEASE_LOST_REASON_UNSPECIFIED),
            last_heartbeat=_text(record, "hb", _PRINTABLE, default=""),
            expires_at=_number(record, "exp", default=0),
            ended_at=_number(record, "at", default=0),
        )
    except _Impossible:
        return None


def prepare_state_dir(path: str | os.PathLike[str]) -> Path:
    """Create the state dir 0700 (or tighten it to 0700); raise StateDirError when it is unusable."""
    directory = Path(path)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if directory.stat().st_mode & 0o077:
            try:
                directory.chmod(0o700)
            except PermissionError:
                log.warning("the state dir is open to others and cannot be tightened", extra={"path": str(path)})
        if not os.access(directory, os.W_OK | os.X_OK):
            raise StateDirError(f"the state dir {directory} is not writable")
    except OSError as exc:
        raise StateDirError(f"the state dir {directory} cannot be used: {exc}") from exc
    return directory


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _write_file(path: Path, data: bytes) -> int:
    """A new file with `data`, fsynced; returns its descriptor (open for appending)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # a partial file would hold on to the space that ran out
        raise
    return fd


def _write_new(path: Path, data: bytes) -> int:
    tmp = path.with_name(f".{path.name}.new")
    fd = _write_file(tmp, data)
    try:
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
