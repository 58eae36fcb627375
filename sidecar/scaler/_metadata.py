"""The trigger's `metadata` (KEDA's `scalerMetadata`): parsed and validated on every call.

`METADATA_KEYS` declares every key the scaler reads (docs/scaler.md's table is generated from it). KEDA's own
keys (`KEDA_KEYS`: `scalerAddress`, the TLS settings) are accepted and ignored; any other key is refused, so a
misspelt key fails loudly instead of silently falling back to a default.

Numbers are plain decimals ("1", "2.5"): ASCII digits with an optional fraction, nothing else (no sign,
exponent, underscore, `inf` or `nan`). Error messages never repeat what the client sent: they name the
scaler's own key and what it accepts.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass

ENVIRONMENT_ID = "environmentId"
TARGET = "targetItemsPerReplica"
ACTIVATION = "activationThreshold"
INCLUDE_IN_PROGRESS = "includeInProgress"

MIN_TARGET = 0.001
"""The smallest target: KEDA hands targets to the HPA in thousandths, so a smaller one would be 0."""
MAX_NUMBER = 1_000_000_000.0
DECIMAL = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,9})?")
"""A plain decimal: ASCII digits only (`[0-9]`, not `\\d`, which also matches other scripts' digits)."""
ENVIRONMENT_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}")
BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True, slots=True)
class MetadataKey:
    """One trigger metadata key the scaler reads: what it means, what it takes, its default."""

    name: str
    meaning: str
    accepts: str
    default: str


METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey(
        ENVIRONMENT_ID,
        "the Work API environment whose queue is read",
        "1 to 128 of `A-Z a-z 0-9 _ -`",
        "`--environment-id`",
    ),
    MetadataKey(
        TARGET,
        "items one replica (or Job) absorbs; `GetMetricSpec` answers it as `targetSizeFloat`",
        f"a plain decimal from {MIN_TARGET:g} to {MAX_NUMBER:.0f}",
        "`--target-items`",
    ),
    MetadataKey(
        ACTIVATION,
        "`IsActive` is true (scale from zero) when the metric exceeds it",
        f"a plain decimal from 0 to {MAX_NUMBER:.0f}",
        "`--activation-threshold`",
    ),
    MetadataKey(
        INCLUDE_IN_PROGRESS,
        "`true`: the metric and `IsActive` also count items in progress (acknowledged, leased), so a busy "
        "fleet with nothing waiting stays active; `false`: only waiting and polled-unacknowledged items",
        "`true` or `false`",
        "`false`",
    ),
)
KEYS = tuple(key.name for key in METADATA_KEYS)
KEDA_KEYS = frozenset(
    {"scalerAddress", "caCert", "tlsCertFile", "tlsClientCert", "tlsClientKey", "unsafeSsl", "enableTLS"}
)
"""KEDA's own trigger settings: KEDA passes the whole metadata map on, so these reach the scaler too."""


class MetadataError(ValueError):
    """A bad `scalerMetadata` value. `key` is the scaler's own key name ('' for an unknown key), `hint` a
    known key the unknown one resembles; neither is ever a string the client sent."""

    def __init__(self, key: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Query:
    environment_id: str
    target: float
    activation: float
    include_in_progress: bool = False


def decimal(raw: str) -> float:
    """A plain decimal number ("2", "0.5"), else ValueError (whose message does not repeat `raw`)."""
    if not DECIMAL.fullmatch(raw):
        raise ValueError("not a plain decimal number")
    return float(raw)


def target_number(raw: str) -> float:
    """`targetItemsPerReplica` (and `--target-items`): a plain decimal from MIN_TARGET to MAX_NUMBER."""
    value = decimal(raw)
    check_target(value)
    return value


def activation_number(raw: str) -> float:
    """`activationThreshold` (and `--activation-threshold`): a plain decimal from 0 to MAX_NUMBER."""
    value = decimal(raw)
    check_activation(value)
    return value


def check_target(value: float) -> None:
    if not MIN_TARGET <= value <= MAX_NUMBER:
        raise ValueError(f"must be from {MIN_TARGET:g} to {MAX_NUMBER:.0f}")


def check_activation(value: float) -> None:
    if not 0 <= value <= MAX_NUMBER:
        raise ValueError(f"must be from 0 to {MAX_NUMBER:.0f}")


def _number(metadata: Mapping[str, str], key: str, default: float, accepts: str) -> float:
    raw = (metadata.get(key) or "").strip(" ")
    if raw == "":
        return default
    convert = target_number if key == TARGET else activation_number
    try:
        return convert(raw)
    except ValueError:
        raise MetadataError(key, f"{key} must be {accepts}") from None


def _flag(metadata: Mapping[str, str], key: str, accepts: str) -> bool:
    raw = (metadata.get(key) or "").strip(" ").lower()
    if raw == "":
        return False
    if raw not in BOOLEANS:
        raise MetadataError(key, f"{key} must be {accepts}")
    return BOOLEANS[raw]


def parse(metadata: Mapping[str, str], *, environment_id: str | None, target: float, activation: float) -> Query:
    accepts = {key.name: key.accepts.replace("`", "") for key in METADATA_KEYS}
    unknown = sorted(set(metadata) - set(KEYS) - KEDA_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0][:200], KEYS, n=1)
        hint = close[0] if close else ""
        suggestion = f" (did you mean {hint}?)" if hint else ""
        raise MetadataError(
            "", f"unknown metadata key{suggestion}: the keys are {', '.join(KEYS)}, and KEDA's own", hint
        )
    environment = (metadata.get(ENVIRONMENT_ID) or "").strip() or environment_id
    if not environment:
        raise MetadataError(ENVIRONMENT_ID, f"{ENVIRONMENT_ID} is required (the scaler has no --environment-id)")
    if not ENVIRONMENT_PATTERN.fullmatch(environment):
        raise MetadataError(ENVIRONMENT_ID, f"{ENVIRONMENT_ID} must be {accepts[ENVIRONMENT_ID]}")
    return Query(
        environment_id=environment,
        target=_number(metadata, TARGET, target, accepts[TARGET]),
        activation=_number(metadata, ACTIVATION, activation, accepts[ACTIVATION]),
        include_in_progress=_flag(metadata, INCLUDE_IN_PROGRESS, accepts[INCLUDE_IN_PROGRESS]),
    )


def markdown_table() -> str:
    """docs/scaler.md's table of trigger metadata keys (a test keeps the page equal to this)."""
    rows = ["| key | meaning | accepts | default |", "|---|---|---|---|"]
    rows += [f"| `{key.name}` | {key.meaning} | {key.accepts} | {key.default} |" for key in METADATA_KEYS]
    return "\n".join(rows)
