"""The state dir fails safe and loud, with real `work-sidecar serve` processes on real files and filesystems.

Guarantees attacked here: the token key is made only while the state dir's lock is held; a journal that cannot be
read is reported and moved aside; while the journal cannot be written the sidecar takes no new work (no polls,
readiness NOT_SERVING, one line saying why), keeps renewing what it holds, and resumes when writes succeed; a
journal record with impossible values is reported and skipped; every start-up failure of the state dir is one line
and exit code 2, leaving no temporary file.

The full-filesystem cases mount a small tmpfs: they need root and are skipped without it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import fcntl
import hmac
import json
import os
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.helpers import eventually, serving, stays

from .conftest import ENV, KEY, Api, Watch
from .test_restart import Sidecar, _hold, _keepalive

BIN = Path(sys.executable).parent / "work-sidecar"
JOURNAL = "leases.journal"


def _run(api: Api, state_dir: str, socket: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_LOG_FORMAT": "json"}
    return subprocess.run(
        [str(BIN), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", f"unix://{socket}",
         "--state-dir", state_dir],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, f"one line (besides JSON log lines), not a traceback: {result.stderr}"
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _leftovers(directory: Path) -> list[str]:
    """Temporary files a failed start must not leave behind."""
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp") or name.endswith(".new"))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                             capture_output=True, check=False)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _fill(path: Path) -> None:
    """Write `path` until the filesystem it is on is full (to the last byte a write can take)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 16
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)


# -- the token key and the lock ----------------------------------------------------------------------------------


async def test_a_sidecar_that_finds_the_state_dir_locked_writes_no_key(api: Api, short_dir: str) -> None:
    """Finding 4.
    Two sidecars started at once on an empty state dir: the one that loses the lock must never write the token
    key (it would replace the key the survivor's lease tokens are made with). Here the test holds the lock."""
    state = Path(short_dir) / "state"
    state.mkdir(mode=0o700)
    lock = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = await asyncio.to_thread(_run, api, str(state), f"{short_dir}/s.sock")
    finally:
        os.close(lock)
    _one_line_exit_2(result, "another work-sidecar")
    assert os.listdir(state) == ["lock"], "no token.key, no temporary file, no journal"


async def _spawn(api: Api, socket: str, state: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        str(BIN), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", socket, "--state-dir", str(state),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.mark.slow
async def test_two_sidecars_started_at_once_on_an_empty_state_dir_agree_on_the_key(api: Api, short_dir: str) -> None:
    """Finding 4.
    Two sidecars started at once on an empty state dir, again and again: the loser exits 2 and the key on disk is
    the one the survivor's lease tokens are made with (a loser that wrote its own key would break every token after
    the survivor's next restart)."""
    for trial in range(8):
        state = Path(short_dir) / f"state-{trial}"
        sockets = [f"unix://{short_dir}/s{trial}-{i}.sock" for i in range(2)]
        procs = [await _spawn(api, socket, state) for socket in sockets]
        try:
            done, _ = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=30,
                                         return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            assert len(done) == 1 and done.pop().result() == 2, "one of the two exits 2 at once"
            survivor = next(i for i, proc in enumerate(procs) if proc.returncode is None)
            async with grpc.aio.insecure_channel(sockets[survivor]) as channel:
                await eventually(lambda: serving(channel), timeout=30, message="the survivor serves")
                watch = Watch(pb_grpc.WorkServiceStub(channel).WatchWork(pb.WatchWorkRequest())).start()
                await api.enqueue(1)
                item = await watch.assigned()
                watch.cancel()
            key = (state / "token.key").read_bytes()
            nonce, _, mac = item.lease_token.partition(".")
            made = hmac.digest(key, f"{item.work.id}|{nonce}".encode(), "sha256")[:18]
            assert mac == base64.urlsafe_b64encode(made).decode(), (
                f"trial {trial}: the key on disk is not the survivor's"
            )
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


# -- start-up failures --------------------------------------------------------------------------------------------


def _key_directory(state: Path) -> None:
    (state / "token.key").mkdir()


def _key_fifo(state: Path) -> None:
    os.mkfifo(state / "token.key", 0o600)  # as root, a mode cannot make a file unreadable: a FIFO never gives bytes


def _key_immutable(state: Path) -> None:
    (state / "token.key").write_bytes(b"")
    made = subprocess.run(["chattr", "+i", str(state / "token.key")], capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot make a file immutable here: {made.stderr.decode().strip()}")


@pytest.mark.parametrize(
    ("make", "named"),
    [(_key_directory, "token.key"), (_key_fifo, "token.key"), (_key_immutable, "token.key")],
    ids=["a-directory", "unreadable-fifo", "immutable"],
)
async def test_a_token_key_that_cannot_be_used_is_one_line_and_exit_2(
    api: Api, short_dir: str, make: Any, named: str
) -> None:
    """Finding 7.
    A token.key that is a directory, cannot be read or cannot be replaced: one line naming it, exit 2, no
    temporary file (not a traceback and exit 1)."""
    state = Path(short_dir) / "state"
    state.mkdir(mode=0o700)
    make(state)
    try:
        result = await asyncio.to_thread(_run, api, str(state), f"{short_dir}/s.sock", timeout=30)
        _one_line_exit_2(result, named)
        assert _leftovers(state) == []
    finally:
        subprocess.run(["chattr", "-i", str(state / "token.key")], capture_output=True, check=False)


@pytest.mark.parametrize("with_key", [False, True], ids=["no-key-yet", "key-made-before"])
async def test_a_full_filesystem_is_one_line_and_exit_2(api: Api, short_dir: str, with_key: bool) -> None:
    """Finding 7.
    --state-dir on a full filesystem, with no key yet (or a key, and no room for the journal): one line and exit
    2, and no temporary file (`.token.key.<pid>.tmp`, `.leases.journal.new`) left behind."""
    with _tmpfs(Path(short_dir) / "mnt", "64k") as mount:
        state = mount / "state"
        state.mkdir(mode=0o700)
        if with_key:
            (state / "token.key").write_bytes(os.urandom(32))
        _fill(mount / "filler")
        result = await asyncio.to_thread(_run, api, str(state), f"{short_dir}/s.sock")
        assert _leftovers(state) == [] and ("token.key" in os.listdir(state)) == with_key
        line = _one_line_exit_2(result, "state dir")
        assert "No space left" in line


def _record(record: dict[str, Any]) -> bytes:
    """One journal line as the sidecar writes it: a valid checksum over the JSON."""
    payload = json.dumps(record, separators=(",", ":")).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


@pytest.fixture
async def restarting(api: Api, short_dir: str) -> AsyncIterator[Sidecar]:
    process = Sidecar(api, short_dir)
    yield process
    await process.close()


async def test_a_record_with_impossible_values_is_reported_and_skipped(api: Api, restarting: Sidecar) -> None:
    """Finding 7.
    A journal record with a valid checksum but impossible values (a non-finite expiry, a negative TTL, a bad id)
    is reported and skipped: the restart adopts the rest and serves, instead of crashing at every start."""
    sidecar = restarting
    await sidecar.start()
    watch, [item] = await _hold(sidecar, 1)
    await sidecar.kill9()
    watch.cancel()
    path = Path(sidecar.state_dir) / JOURNAL
    good = next(json.loads(line.split(b" ", 1)[1]) for line in path.read_bytes().splitlines() if b'"op":"L"' in line)
    impossible = [
        {**good, "work": "work_inf", "exp": float("inf")},
        {**good, "work": "work_nan", "exp": float("nan")},
        {**good, "work": "work_neg", "ttl": -5},
        {**good, "work": "../../etc"},
        {**good, "work": "work_state", "state": 99},
        {"op": "E", "work": "work_end", "nonce": "n", "state": 3, "reason": 1e400},
    ]
    with path.open("ab") as journal:
        journal.write(b"".join(_record(record) for record in impossible))
    await sidecar.start()
    statuses = await _keepalive(sidecar.stub, [item])
    assert statuses[item.work.id].state == pb.LEASE_STATE_ACTIVE, "the good lease is adopted"
    damage = [line for line in sidecar.log_lines() if "journal was damaged" in line.get("msg", "")]
    assert len(damage) == 1 and damage[0]["invalid"] == len(impossible), damage


# -- a journal that cannot be read -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b'39a79110 {"op":"H","format":1,"environment_id":"env_te', b"garbage with no newline"],
    ids=["empty", "header-torn", "garbage"],
)
async def test_a_journal_with_no_newline_is_reported_and_moved_aside(
    api: Api, restarting: Sidecar, content: bytes
) -> None:
    """Finding 5.
    A journal with no complete line (an empty file, a header torn mid-line, garbage with no newline) is not
    silently taken for no journal: it is reported in one line and moved aside like any corrupt journal."""
    sidecar = restarting
    state = Path(sidecar.state_dir)
    state.mkdir(mode=0o700)
    (state / JOURNAL).write_bytes(content)
    await sidecar.start()
    refused = [line for line in sidecar.log_lines() if "was not adopted" in line.get("msg", "")]
    assert len(refused) == 1, sidecar.log_lines()
    assert Path(refused[0]["moved_to"]).read_bytes() == content, "moved aside as it was"


def _journal_directory(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_bytes(b"x")


def _journal_fifo(path: Path) -> None:
    os.mkfifo(path, 0o600)


@pytest.mark.parametrize("make", [_journal_directory, _journal_fifo], ids=["a-directory", "a-fifo"])
async def test_a_journal_that_cannot_be_read_is_reported_and_moved_aside(
    api: Api, restarting: Sidecar, make: Any
) -> None:
    """A journal that cannot be read (here: not a regular file) is reported in one line and moved aside like any
    corrupt journal; the sidecar starts with a fresh one (it neither exits nor blocks on a FIFO)."""
    sidecar = restarting
    state = Path(sidecar.state_dir)
    state.mkdir(mode=0o700)
    make(state / JOURNAL)
    await sidecar.start()
    refused = [line for line in sidecar.log_lines() if "was not adopted" in line.get("msg", "")]
    assert len(refused) == 1 and "cannot be read" in refused[0]["reason"], sidecar.log_lines()
    assert os.path.lexists(refused[0]["moved_to"]) and (state / JOURNAL).is_file()


# -- a journal that cannot be written --------------------------------------------------------------------------


async def test_while_the_journal_cannot_be_written_no_new_work_is_taken(api: Api, restarting: Sidecar) -> None:
    """Finding 6.
    A state dir that fills up while the sidecar runs: it takes no new work (no polls, readiness NOT_SERVING, one
    line saying why), keeps renewing the leases it holds, and takes work again once writes succeed; a kill -9 after
    that loses no lease."""
    sidecar = restarting
    sidecar.ttl = 2
    with _tmpfs(Path(sidecar.dir) / "mnt", "256k") as mount:
        sidecar.state = str(mount / "state")
        await sidecar.start()
        assert sidecar.channel is not None
        channel = sidecar.channel
        watch, items = await _hold(sidecar, 4)
        free = sidecar.stub.WatchWork(pb.WatchWorkRequest(max_in_flight=1, sandbox_id="sb-2"))
        second = asyncio.ensure_future(anext(aiter(free)))  # a sandbox with a free slot: the poller wants work
        _fill(mount / "filler")
        await eventually(lambda: _not_serving(channel), timeout=20, message="readiness NOT_SERVING")
        polls = len(await api.requests("poll"))  # a poll in flight when the journal failed may still come back
        beats = {item.work.id: (await api.item(item.work.id))["heartbeats"] for item in items}
        [queued] = await api.enqueue(1)

        async def taking_nothing() -> bool:
            return not second.done() and len(await api.requests("poll")) <= polls + 1

        await stays(taking_nothing, seconds=3.0)
        for item in items:
            assert (await api.item(item.work.id))["heartbeats"] >= beats[item.work.id] + 2, "renewals go on"
        assert watch.events.empty(), "no lease lost, nothing assigned"
        (mount / "filler").unlink()
        await eventually(lambda: serving(channel), timeout=20, message="readiness SERVING again")
        assigned = await asyncio.wait_for(second, 20)
        assert assigned.work_assigned.work.id == queued["id"], "new work is taken again"
        lines = sidecar.log_lines()
        failing = [
            line
            for line in lines
            if line.get("logger") == "sidecar.journal" and line["msg"].startswith("the lease journal cannot be written")
        ]
        assert len(failing) == 1 and failing[0]["error"] == "No space left on device", failing
        assert any(line.get("msg", "").startswith("the lease journal can be written again") for line in lines)
        assert any(
            line.get("msg") == "readiness changed" and line["reasons"] == ["journal_unwritable"] for line in lines
        )
        await sidecar.kill9()
        free.cancel()
        watch.cancel()
        await sidecar.start()
        adopted = [line for line in sidecar.log_lines() if line.get("msg", "").startswith("adopted the leases")]
        assert adopted and adopted[0]["leases"] == 5, "every lease taken while or after the disk was full survived"
        await sidecar.close()


async def _not_serving(channel: grpc.aio.Channel) -> bool:
    return not await serving(channel)
