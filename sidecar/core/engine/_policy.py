"""The sidecar's policies: every timing rule as a named, documented, frozen object.

Tests and `bench/` import these instead of copying a formula; the CLI takes its defaults from them
(`sidecar.cli` reads each flag's default off the dataclass field), so every default is declared here once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..._fencing import FENCE_MARGIN_MIN, FENCE_MARGIN_RATIO, fence_margin
from ...wire import MAX_BLOCK_MS, MIN_BLOCK_MS

MIN_ATTEMPT_SECONDS = 1.0
"""The least time a heartbeat attempt is given (`LeasePolicy.attempt_timeout`)."""
MIN_SEND_SECONDS = 0.1
"""No renewal is sent with less time than this left before its lease's fencing point: its answer could not come in
time, and a renewal the Work API applies that the sidecar cannot wait for only extends the lease for nobody."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: the n-th consecutive failure (n ≥ 1) waits a random time in
    [ceiling/2, ceiling], ceiling = min(maximum, initial * multiplier**(n-1)). Half the ceiling at least, so a
    run of failures really backs off instead of retrying at once by chance."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError("backoff: need 0 < initial <= maximum and multiplier >= 1")

    def ceiling(self, failures: int) -> float:
        return min(self.maximum, self.initial * self.multiplier ** max(0, failures - 1))

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        ceiling = self.ceiling(failures)
        return (rng or random).uniform(ceiling / 2, ceiling)


@dataclass(frozen=True, slots=True)
class LeasePolicy:
    """How leases are kept: renewal schedule, self-fencing, liveness of the sandbox, release.

    - A lease is renewed every `heartbeat_interval(ttl)`: clamp(ttl/2, min_interval, max_interval), but at most
      half the window before the fencing point (see there), echoing the previous `last_heartbeat` exactly; one
      renewal (with its retries) may take at most that interval.
    - A failed renewal is retried after `retry_delay(ttl)` until `fence_margin(ttl)` before the TTL since the last
      successful heartbeat *was sent* runs out (none is sent with less than `MIN_SEND_SECONDS` left); then the
      sidecar declares the lease lost itself (self-fencing).
    - A lease lives while its sandbox does: its WatchWork stream is open, or KeepAlive pinged it within
      `liveness_window`. Otherwise it waits `reattach_grace`, then is released with one last heartbeat asking
      for `release_ttl_seconds` (None: no such heartbeat), so the item returns to the queue sooner.
    """

    ttl_seconds: int = 60
    """The lease TTL asked for with every heartbeat (the Work API clamps it)."""
    liveness_window: float = 30.0
    """A lease whose WatchWork stream is gone stays alive while KeepAlive pings it at least this often (s)."""
    reattach_grace: float = 30.0
    """After a sandbox disappears, how long its leases wait for it to re-attach before they are released (s); while
    the sidecar drains they are released at once."""
    release_ttl_seconds: int | None = 10
    """On release, one last heartbeat asks for this TTL so the item returns to the queue sooner (None: skip)."""
    release_timeout: float = 5.0
    """How long that last heartbeat may take (s)."""
    claim_timeout: float = 30.0
    """How long one claiming heartbeat (NO_HEARTBEAT, right after the ack) may take with its retries (s). When it
    fails without a definitive answer, the claim goes on after `claim_backoff`: an acked item is never left
    `starting` while the Work API can still be asked."""
    claim_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    confirm_refusals: int = 2
    """A refusal the sidecar has reason to doubt is asked again this many times (after `claim_backoff`) before it
    is believed: a claim answered 412/409/404 right after the ack (an acked item nobody claims stays `starting`),
    and a stop answered with a 4xx (but 404 and 429) or a body that does not parse while a read shows the item has
    not reached the state asked for. One such answer may be invented on the way (a proxy, a fault); a real refusal
    repeats. A claim that lands on the retry is ours: the compare-and-swap on NO_HEARTBEAT
    lets only one claim win."""
    heartbeat_concurrency: int = 256
    """Renewals in flight at once at most (the rest wait their turn in O(1)), and the connections of the heartbeat
    lane, which no poll, ack, stop or read can take."""
    min_interval: float = 1.0
    max_interval: float = 30.0
    retry_jitter: tuple[float, float] = (0.2, 1.0)
    """A failed renewal is retried after uniform(*retry_jitter) * min(retry_cap, interval/2) seconds."""
    retry_cap: float = 2.0

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0:
            raise ValueError("--ttl must be positive")
        for name in ("liveness_window", "reattach_grace", "claim_timeout", "release_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must not be negative")
        if self.confirm_refusals < 0:
            raise ValueError("--confirm-refusals must not be negative")
        if self.heartbeat_concurrency < 1:
            raise ValueError("heartbeat concurrency must be at least 1")
        if self.release_ttl_seconds is not None and self.release_ttl_seconds <= 0:
            raise ValueError("--release-ttl must be positive (or 0 for off)")

    fence_margin_min: float = FENCE_MARGIN_MIN
    fence_margin_ratio: float = FENCE_MARGIN_RATIO
    """Self-fencing happens `fence_margin(ttl)` = max(fence_margin_min, ttl * fence_margin_ratio) seconds *before*
    the TTL since the last successful heartbeat was sent runs out, so the sandbox hears LeaseLost before the Work
    API may hand the item to anyone else (1.5 s for TTLs up to 15 s, 6 s for the default 60 s)."""

    def fence_margin(self, ttl_seconds: float) -> float:
        """max(fence_margin_min, ttl * fence_margin_ratio), and never more than half the TTL (`sidecar._fencing`)."""
        return fence_margin(ttl_seconds, self.fence_margin_min, self.fence_margin_ratio)

    def heartbeat_interval(self, ttl_seconds: float) -> float:
        """clamp(ttl/2, min_interval, max_interval) as the official workers do, but at most half of the fenced
        window (ttl - fence_margin): the official cadence halves a window that ends at the TTL, this one halves the
        window that ends at the fencing point, so a renewal (and its retries) always has as long as the interval
        before the sidecar fences, even against a slow Work API. 27 s at the default TTL 60 (not 30), 4.25 s at
        TTL 10, 1.25 s at TTL 4, 0.5 s at TTL 2."""
        official = max(self.min_interval, min(ttl_seconds / 2, self.max_interval))
        return min(official, 0.5 * (ttl_seconds - self.fence_margin(ttl_seconds)))

    def attempt_timeout(self, budget: float) -> float:
        """Seconds one heartbeat attempt may take within a renewal's `budget`: half of it, so that an answer dripped
        or lost past it leaves time for another attempt (whose refusal, if the first was applied, is settled by
        reading). A budget too short for two attempts of `MIN_ATTEMPT_SECONDS` (a loaded host answers slowly) goes
        whole to one attempt: cutting it would only make a slow answer late, with no time left to ask again."""
        return budget if budget < 2 * MIN_ATTEMPT_SECONDS else budget / 2

    def retry_delay(self, ttl_seconds: float, rng: random.Random | None = None) -> float:
        low, high = self.retry_jitter
        return (rng or random).uniform(low, high) * min(self.retry_cap, self.heartbeat_interval(ttl_seconds) / 2)


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """How the sidecar polls: one long poll while anything has room, more while items keep coming."""

    block_ms: int = MAX_BLOCK_MS
    max_pollers: int = 256
    """Upper bound of parallel long polls while items keep coming (one when the queue is empty). Below it, the
    pollers follow free capacity: every poll that returns an item may add one while free slots outnumber polls
    in flight, so a burst of 100 items at 100 free slots is polled by up to 100 pollers within a few round
    trips; a poller that comes back empty leaves."""
    idle_poll_gap: float = 0.0
    """Seconds to wait after an empty poll before the next one (0: poll again at once). A one-sandbox pod that
    sets 2 makes 20 idle requests a minute instead of 60 (as the official SDK worker does: it sleeps 1-3 s after
    an empty poll), at the price of up to that long before an item that arrives meanwhile is dispatched."""
    reclaim_older_than_ms: int | None = None
    unclaimed_wait: float = 2.0
    """An item polled while no sandbox had a free slot (one left as the poll returned) waits this long for a
    slot before it is left unacked for the Work API to reclaim (0: leave it at once)."""
    transient_backoff: Backoff = field(default_factory=lambda: Backoff(initial=0.5, maximum=10.0))
    """After a failed poll that is worth retrying soon (5xx, 429, a dropped connection)."""
    final_backoff: Backoff = field(default_factory=lambda: Backoff(initial=2.0, maximum=60.0))
    """After a failed poll that will not heal by itself soon (401, 403, 400: a revoked key, a wrong environment):
    it grows to a minute, so such an error is logged once a minute, not every few seconds."""

    def __post_init__(self) -> None:
        if not MIN_BLOCK_MS <= self.block_ms <= MAX_BLOCK_MS:
            raise ValueError(f"poll block must be {MIN_BLOCK_MS}..{MAX_BLOCK_MS} ms")
        if self.max_pollers < 1:
            raise ValueError("max pollers must be at least 1")
        if not 0 <= self.idle_poll_gap <= 3600:
            raise ValueError("--idle-poll-gap must be 0..3600 seconds")
        if self.unclaimed_wait < 0:
            raise ValueError("unclaimed-wait must not be negative")
