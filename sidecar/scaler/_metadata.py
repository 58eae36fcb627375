"""The trigger's `metadata` (KEDA's `scalerMetadata`): parsed and validated on every call.

- `environmentId`: the Work API environment whose queue is read (default `--environment-id`);
- `targetItemsPerReplica`: how many items needing a replica one replica (or Job) absorbs, > 0
  (default `--target-items`, 1);
- `activationThreshold`: active (scale from zero) when items needing a replica exceed it, ≥ 0
  (default `--activation-threshold`, 0).

Values are decimal numbers ("1", "2.5"). KEDA's own keys (`scalerAddress`, the TLS settings) are
accepted and ignored; any other key is refused, so a misspelt key fails loudly instead of silently
falling back to a default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

ENVIRONMENT_ID = "environmentId"
TARGET = "targetItemsPerReplica"
ACTIVATION = "activationThreshold"
KEYS = (ENVIRONMENT_ID, TARGET, ACTIVATION)
KEDA_KEYS = frozenset(
    {"scalerAddress", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey", "unsafeSsl", "enableTLS"}
)
ENVIRONMENT_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class MetadataError(ValueError):
    """A bad `scalerMetadata` value: `key` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True, slots=True)
class Query:
    environment_id: str
    target: float
    activation: float


def _number(metadata: Mapping[str, str], key: str, default: float, *, positive: bool) -> float:
    raw = metadata.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key, f"{key} must be a number, not {raw[:40]!r}") from None
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise MetadataError(key, f"{key} must be {'greater than 0' if positive else 'at least 0'}, not {raw[:40]!r}")
    return value


def parse(metadata: Mapping[str, str], *, environment_id: str | None, target: float, activation: float) -> Query:
    unknown = sorted(set(metadata) - set(KEYS) - KEDA_KEYS)
    if unknown:
        raise MetadataError(unknown[0], f"unknown metadata key {unknown[0][:40]!r}: the keys are {', '.join(KEYS)}")
    environment = (metadata.get(ENVIRONMENT_ID) or "").strip() or environment_id
    if not environment:
        raise MetadataError(ENVIRONMENT_ID, f"{ENVIRONMENT_ID} is required (the scaler has no --environment-id)")
    if not ENVIRONMENT_PATTERN.match(environment):
        raise MetadataError(ENVIRONMENT_ID, f"{ENVIRONMENT_ID} is not a valid environment id")
    return Query(
        environment_id=environment,
        target=_number(metadata, TARGET, target, positive=True),
        activation=_number(metadata, ACTIVATION, activation, positive=False),
    )
