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
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

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
        """The key in `state_dir/token.key`, created (0600, atomically) on first use."""
        path = Path(state_dir) / KEY_FILE
        try:
            key = path.read_bytes()
        except FileNotFoundError:
            key = b""
        if key and len(key) != KEY_BYTES:
            aside = path.with_name(f"{KEY_FILE}.corrupt-{int(time.time())}")
            os.replace(path, aside)
            log.error(
                "the token key in the state dir is damaged: moved aside, using a new one (sandboxes of adopted "
                "leases cannot re-attach; those leases are released after the grace)",
                extra={"path": str(path), "moved_to": str(aside)},
            )
            key = b""
        if not key:
            key = secrets.token_bytes(KEY_BYTES)
            tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, key)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        return cls(key)

    def issue(self, work_id: str) -> tuple[str, str]:
        """A fresh (token, nonce) for a new lease on `work_id`."""
        nonce = secrets.token_urlsafe(12)
        return self.token(work_id, nonce), nonce

    def token(self, work_id: str, nonce: str) -> str:
        mac = hmac.digest(self._key, f"{work_id}|{nonce}".encode(), "sha256")[:18]  # OpenSSL's one-shot HMAC
        return f"{nonce}.{base64.urlsafe_b64encode(mac).decode()}"
