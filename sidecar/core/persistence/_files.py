"""The state dir on disk: its creation, its lock, and the file operations the journal is built on.

Every failure that stops a start is a `StateDirError` whose message is one line naming the cause and the fix; a
file written in parts (a temporary file, a compaction) is removed when writing it fails, so a full filesystem is
not left fuller.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import time
from pathlib import Path

log = logging.getLogger("sidecar.journal")

JOURNAL_FILE = "leases.journal"
LOCK_FILE = "lock"


class StateDirError(RuntimeError):
    """The state dir cannot be used (another sidecar holds it, or it is not writable)."""


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
        raise StateDirError(f"the state dir {directory} cannot be used ({exc.strerror}): check --state-dir") from None
    return directory


def lock_state_dir(directory: Path) -> int:
    """Take the state dir's lock (`flock` on DIR/lock, held until the descriptor is closed or the process ends)."""
    try:
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StateDirError(f"cannot lock the state dir {directory} ({exc.strerror}): check --state-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirError(
            f"another work-sidecar process uses the state dir {directory}: give each sidecar its own"
        ) from None
    return fd


def remove_leftovers(directory: Path) -> None:
    """Remove the temporary files a process killed while writing them left behind (call with the lock held)."""
    for pattern in (".*.tmp", ".*.new", ".*.compact"):
        for leftover in directory.glob(pattern):
            with contextlib.suppress(OSError):
                leftover.unlink()
                log.info("removed a temporary file left in the state dir", extra={"path": str(leftover)})


def read_journal(path: Path) -> bytes | None:
    """The journal's bytes, or None when there is none. Raises OSError when it cannot be read, including when it
    is not a regular file (a FIFO would block the start)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def move_aside(path: Path, kind: str) -> Path:
    """Rename `path` to `<name>.<kind>-<time>-<pid>` next to it (it stays for a person to look at)."""
    target = path.with_name(f"{path.name}.{kind}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    os.replace(path, target)
    return target


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_file(path: Path, data: bytes) -> int:
    """A new file with `data`, fsynced; returns its descriptor (open for appending). Removed when this fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)  # a partial file would hold on to the space that ran out
        raise
    return fd


def write_new(path: Path, data: bytes) -> int:
    """Replace `path` atomically by a new file with `data`; returns its descriptor (open for appending)."""
    tmp = path.with_name(f".{path.name}.new")
    fd = write_file(tmp, data)
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
