"""The emulator's flavour table: which providers it serves, and how each behaves where their documents differ.

What a provider's requests and answers look like (paths, headers, limits, pagination, error types) is its
profile in `sidecar.wire`; a `Flavour` adds only the behaviour the emulator gives it. Adding a provider is one
profile there and one row here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..wire import ANTHROPIC, QODER, Provider


@dataclass(frozen=True, slots=True)
class Flavour:
    """How the emulator answers as one provider."""

    provider: Provider
    strict_heartbeats: bool = False
    """400 on an `expected_last_heartbeat` that is neither NO_HEARTBEAT nor RFC 3339; 409 on a heartbeat of a queued
    or stopped item; the compare-and-swap applies while `stopping` too (Qoder). Otherwise a stopped item's heartbeat
    is answered and never extended, and `stopping` compares only with `anthropic_compare_while_stopping`."""
    ack_requires_polling_worker: bool = False
    """Always 409 when the ack's worker id differs from the poll's (else: the `ack_requires_polling_worker`
    setting decides)."""
    credential_hint: str = ""
    """Added to the 401 of a request without a credential this flavour takes."""

    @property
    def name(self) -> str:
        return self.provider.name


FLAVOURS: Sequence[Flavour] = (
    Flavour(ANTHROPIC),
    Flavour(
        QODER,
        strict_heartbeats=True,
        ack_requires_polling_worker=True,
        credential_hint=" (Qoder takes a personal access token as Authorization: Bearer only)",
    ),
)
"""Every flavour the emulator serves by default, the first the one an unknown path is logged under."""
