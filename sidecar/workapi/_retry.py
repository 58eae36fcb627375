"""When and how the client retries, per operation.

As the official clients do: connection errors (not a TLS certificate problem), timeouts, 408, 429 and 5xx are
retried with exponential backoff and full jitter, honouring `retry-after-ms`, `retry-after` (seconds or an HTTP
date) and `x-should-retry`; every other 4xx is final. Every operation has a deadline, so nothing retries forever.

What a 409 means depends on the operation:
- poll, ack, heartbeat, stop: final. On ack it means the item is no longer this worker's to take
  (acked already, reclaimed, or polled by another worker); on heartbeat, that the item is queued or
  stopped (Qoder), i.e. the lease is gone; on stop, that the item is already stopped.
- get, list, update, stats: retried, as the official clients do (a transient write conflict).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ._errors import APIStatusError, ResponseError, TLSError, TransportError, WorkApiError

CONFLICT_IS_TRANSIENT = frozenset({"get", "update", "list", "stats"})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry settings for one operation."""

    max_attempts: int = 6
    initial_backoff: float = 0.5
    """Seconds; the n-th retry waits a random time in [0, min(max_backoff, initial_backoff * 2**(n-1))]."""
    max_backoff: float = 8.0
    deadline: float = 30.0
    """Seconds from the first attempt after which no new attempt starts."""
    max_retry_after: float = 60.0
    """A server's retry-after longer than this is not honoured; the backoff applies instead."""


@dataclass(frozen=True, slots=True)
class RetryPolicies:
    """A default policy and per-operation overrides."""

    default: RetryPolicy = RetryPolicy()
    per_operation: Mapping[str, RetryPolicy] = field(
        default_factory=lambda: MappingProxyType({"poll": RetryPolicy(deadline=60.0, max_attempts=8)})
    )

    def for_operation(self, operation: str) -> RetryPolicy:
        return self.per_operation.get(operation, self.default)


def is_retryable(exc: BaseException, operation: str) -> bool:
    if isinstance(exc, TLSError):  # a certificate problem does not pass
        return False
    if isinstance(exc, TransportError):
        return True
    if isinstance(exc, ResponseError) or not isinstance(exc, WorkApiError):
        return False
    if isinstance(exc, APIStatusError):
        if exc.should_retry is not None:
            return exc.should_retry
        status = exc.status_code
        if status == 409:
            return operation in CONFLICT_IS_TRANSIENT
        return status in (408, 429) or status >= 500
    return False


def retry_delay(policy: RetryPolicy, attempt: int, exc: BaseException) -> float:
    """Seconds to wait after failed attempt number `attempt` (1-based): the server's retry-after when it gave a
    sane one, else full-jitter backoff."""
    if isinstance(exc, APIStatusError) and exc.retry_after is not None and exc.retry_after <= policy.max_retry_after:
        return exc.retry_after
    ceiling = min(policy.max_backoff, policy.initial_backoff * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)
