"""The fencing rule, written once for the sidecar and its clients.

A lease must be given up a margin *before* the Work API may hand its item to anyone else: max(`minimum`,
`ratio` * TTL), and never more than half the TTL. With the defaults: 1.5 s up to TTL 15 s, 10 % of the TTL
above (6 s at the default 60 s), half the TTL below 3 s. The sidecar fences by it when renewals fail
(`sidecar.core.LeasePolicy`); the Python client and the exec adapter fence by it while the sidecar cannot be reached.
"""

from __future__ import annotations

FENCE_MARGIN_MIN = 1.5
"""A second for the request in flight and the Work API's clock, half a second for the sandbox to hear it."""
FENCE_MARGIN_RATIO = 0.1


def fence_margin(ttl_seconds: float, minimum: float = FENCE_MARGIN_MIN, ratio: float = FENCE_MARGIN_RATIO) -> float:
    return min(max(minimum, ttl_seconds * ratio), ttl_seconds / 2)
