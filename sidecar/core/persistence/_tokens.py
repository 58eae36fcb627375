"""Lease tokens a restarted sidecar can verify.

    token = nonce "." base64url(HMAC-SHA256(key, work_id "|" nonce)[:18])

The nonce is random per lease and goes to the journal; the token itself never does. With `--state-dir` the
key lives in `DIR/token.key` (0600), so the successor of a crashed sidecar recomputes exactly the tokens its
predecessor issued for the leases it adopts: a sandbox re-attaches with the token it already has. Someone who
can read the journal but not the key cannot forge a token. Without a state dir the key is random per process
(tokens die with the process, as before).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hmac
import logging
import os
import secrets
import stat
import time
from pathlib import Path

from ._files import StateDirError

log = logging.getLogger("sidecar.tokens")

KEY_FILE = "token.key"
KEY_BYTES = 32


class TokenIssuer:
    """Issues lease tokens and recomputes them from (work id, nonce)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a token key needs at least 16 bytes")
        self._key = key

    def __repr__(self) -> str:
        return "TokenIssuer(<key redacted>)"

    @classmethod
    def ephemeral(cls) -> TokenIssuer:
        return cls(secrets.token_bytes(KEY_BYTES))

    @classmethod
    def in_dir(cls, state_dir: str | os.PathLike[str]) -> TokenIssuer:
        """The key in `state_dir/token.key`, created (0600, atomically) on first use. The caller holds the state
        dir's lock (`persistence.Journal.lock`): a sidecar that lost the race for the state dir never writes a key.
        Raises `StateDirError` (one line) when the key cannot be read or made; a failed attempt leaves no file."""
        path = Path(state_dir) / KEY_FILE
        key = _read_key(path)
        if key and len(key) != KEY_BYTES:
            aside = path.with_name(f"{KEY_FILE}.corrupt-{int(time.time())}")
            try:
                os.replace(path, aside)
            except OSError as exc:
                raise StateDirError(
                    f"the token key {path} is damaged and cannot be moved aside ({exc.strerror}): remove it"
                ) from None
            log.error(
                "the token key in the state dir is damaged: moved aside, using a new one (sandboxes of adopted "
                "leases cannot re-attach; those leases are released after the grace)",
                extra={"path": str(path), "moved_to": str(aside)},
            )
            key = b""
        if not key:
            key = secrets.token_bytes(KEY_BYTES)
            _write_key(path, key)
        return cls(key)

    def issue(self, work_id: str) -> tuple[str, str]:
        """A fresh (token, nonce) for a new lease on `work_id`."""
        nonce = secrets.token_urlsafe(12)
        return self.token(work_id, nonce), nonce

    def token(self, work_id: str, nonce: str) -> str:
        mac = hmac.digest(self._key, f"{work_id}|{nonce}".encode(), "sha256")[:18]  # OpenSSL's one-shot HMAC
        return f"{nonce}.{base64.urlsafe_b64encode(mac).decode()}"


def _read_key(path: Path) -> bytes:
    """The key file's bytes (b"" when there is none); a key that is not a readable regular file is an error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO must not block the start
    except FileNotFoundError:
        return b""
    except OSError as exc:
        raise StateDirError(f"cannot read the token key {path} ({exc.strerror}): fix its permissions") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateDirError(f"the token key {path} is not a regular file: remove it")
        return os.read(fd, KEY_BYTES + 1)
    except OSError as exc:
        raise StateDirError(f"cannot read the token key {path} ({exc.strerror}): remove it") from None
    finally:
        os.close(fd)


def _write_key(path: Path, key: bytes) -> None:
    """Write the key to a temporary file, fsync, and rename it into place; remove the temporary file on failure."""
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if os.write(fd, key) != len(key):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StateDirError(
            f"cannot create the token key {path} ({exc.strerror}): free space in the state dir or fix its permissions"
        ) from None
