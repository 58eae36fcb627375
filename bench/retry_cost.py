"""`python -m bench.retry_cost`: the CPU that tenacity's retry loop adds to one call that succeeds at once.

Why the Work API client sends its first attempt without tenacity and hands only the retries to it
(`sidecar/workapi/_client.py`, `WorkApiClient._retry`): the loop's bookkeeping costs ~20 µs per call on the
2-core machine of the benchmarks, 4 % of the 0.5 ms CPU budget of a whole request (issue #13).
"""

from __future__ import annotations

import asyncio
import time

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, stop_before_delay, wait_random_exponential


async def _succeed() -> int:
    return 1


async def _direct() -> int:
    return await _succeed()


_RETRYING = AsyncRetrying(
    stop=stop_after_attempt(6) | stop_before_delay(30),
    retry=retry_if_exception(lambda exc: True),
    wait=wait_random_exponential(0.5, 8),
    reraise=True,
)


async def _with_tenacity() -> int:
    return await _RETRYING(_succeed)


async def _measure(calls: int) -> dict[str, float]:
    result = {}
    for name, call in (("direct", _direct), ("tenacity", _with_tenacity)):
        started = time.process_time()
        for _ in range(calls):
            await call()
        result[name] = (time.process_time() - started) / calls * 1e6
    return result


def main() -> None:
    figures = asyncio.run(_measure(50_000))
    print(f"CPU per call that succeeds at once: direct {figures['direct']:.1f} µs, ", end="")
    print(f"through tenacity's AsyncRetrying {figures['tenacity']:.1f} µs")


if __name__ == "__main__":
    main()
