"""A renewal the Work API applied, whose answer the sidecar never got intact, never costs the lease: black-box, a
real `work-sidecar serve` behind the fault proxy, the real emulator, a real gRPC watcher.

Each fault spoils exactly one renewal after the emulator applied it (the answer lost, cut off, garbled, framed
against itself, followed by a stray second answer, behind a 1 MiB header block, the connection reset as it is
reused). The sidecar's next attempt echoes the old `last_heartbeat` and is refused with 412 for its own heartbeat:
believing that refusal tells the sandbox `LeaseLost` while the API shows the item active, and the item runs twice
(the review of `467db17`, findings 1 and 2: every case here failed there on the default exchange, except the
header block, which it read whole; on httpx a closed connection and a 1 MiB header block did). Each must keep the
lease: no `LeaseLost`, and the item is renewed twice more by the same sidecar.
"""

from __future__ import annotations

from typing import Any

import pytest

from chaos.harness import Emulator, wait_for
from chaos.proxy import Proxy
from sidecar.work.v1 import work_service_pb2 as pb
from tests.chaos.conftest import watcher

pytestmark = pytest.mark.timeout(90)
ENV = "env_chaos"
TTL = 4

FAULTS: dict[str, dict[str, Any]] = {
    "dropped": {"action": "drop", "forward_first": True},
    "cut-off": {"action": "mutate", "mutation": "truncated"},
    "garbage": {"action": "mutate", "mutation": "garbage"},
    "ttl-nan": {"action": "mutate", "mutation": "ttl_nan"},
    "ttl-1e20": {"action": "mutate", "mutation": "ttl_huge"},
    "no-last-heartbeat": {"action": "mutate", "mutation": "last_heartbeat_missing"},
    "stray-second-answer": {"action": "twice"},
    "stray-200-instead": {"action": "body", "body": "{}", "status": 200, "forward_first": True},
    "length-and-chunked": {"action": "framing", "framing": "cl_chunked"},
    "two-lengths": {"action": "framing", "framing": "two_cl"},
    "reset-as-reused": {"action": "reset", "forward_first": True},
    "header-block-1MiB": {"action": "header_block", "size": 1 << 20},
}


HTTPX_FAULTS = ("dropped", "reset-as-reused", "header-block-1MiB")
"""The faults the review found costing the lease on the httpx backend."""


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_renewal_applied_whose_answer_was_spoiled_keeps_the_lease(
    emulator: Emulator, proxy: Proxy, sidecar: Any, fault: str
) -> None:
    await _keeps_the_lease(emulator, proxy, await sidecar(ENV, ttl=TTL), fault)


@pytest.mark.parametrize("fault", HTTPX_FAULTS)
async def test_on_httpx_a_renewal_applied_whose_answer_was_spoiled_keeps_the_lease(
    emulator: Emulator, proxy: Proxy, sidecar: Any, fault: str
) -> None:
    await _keeps_the_lease(emulator, proxy, await sidecar(ENV, ttl=TTL, extra=["--http-backend", "httpx"]), fault)


async def _keeps_the_lease(emulator: Emulator, proxy: Proxy, sc: Any, fault: str) -> None:
    async with watcher(sc.target) as w:
        await emulator.enqueue(ENV, 1)
        item = await wait_for(w.assigned, timeout=30)
        assert isinstance(item, pb.WorkAssigned), f"no WorkAssigned (events: {w.events})"
        work_id = item.work.id
        rule = proxy.add(operation="renew", count=1, **FAULTS[fault])
        assert await wait_for(lambda: rule.matched >= 1, timeout=20), "no renewal met the fault"
        spoiled = (await emulator.item(ENV, work_id))["heartbeats"]

        async def renewed_twice_since() -> bool:
            view = await emulator.item(ENV, work_id)
            return bool(view["state"] == "active" and view["heartbeats"] >= spoiled + 2)

        # two more renewals land (the fault's refusal settled in between), and the sandbox never heard LeaseLost
        assert await wait_for(renewed_twice_since, timeout=2 * TTL, interval=0.1), "the lease was not renewed again"
        assert w.lost_at(work_id) is None, f"LeaseLost after a {fault} renewal answer the API had applied"
        assert [k for _, k, _ in w.events] == ["work_assigned"], w.events
