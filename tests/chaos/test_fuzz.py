"""gRPC input fuzzing (Hypothesis, `chaos/fuzz.py`) for every WorkService RPC against a real sidecar process:
only documented status codes, never UNKNOWN, no crash, bounded RSS."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from chaos.fuzz import RPCS, RSS_BOUND, FuzzTarget, Held, fuzz_rpc
from chaos.harness import Emulator, Processes

EXAMPLES = 40


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[FuzzTarget, Held]]:
    procs = Processes()
    emulator = asyncio.run(Emulator.start(procs))
    fuzz = FuzzTarget(emulator.url, str(procs.directory))
    try:
        fuzz.wait_ready()
        yield fuzz, fuzz.take_lease()
    finally:
        fuzz.close()
        procs.kill_all()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rpc", RPCS)
def test_fuzzed_requests_get_documented_codes(target: tuple[FuzzTarget, Held], rpc: str) -> None:
    """guarantee: every gRPC error has a documented status code (never UNKNOWN), for random and malformed fields
    (3 MB strings, newlines, control characters, path-like ids, huge numbers); the sidecar stays up."""
    fuzz, held = target
    report = fuzz_rpc(fuzz.target, rpc, held, examples=EXAMPLES, alive=fuzz.alive)
    assert report.examples >= 1
    assert fuzz.alive(), "the sidecar died"
    assert not report.failures, "\n".join(report.failures[:10])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rpc", RPCS)
def test_undecodable_requests_get_invalid_argument(target: tuple[FuzzTarget, Held], rpc: str) -> None:
    """guarantee: malformed requests (undecodable protobuf, invalid UTF-8 in a string field, sent as raw bytes on a
    generic channel call) get a documented code, never UNKNOWN."""
    fuzz, held = target
    report = fuzz_rpc(fuzz.target, rpc, held, examples=15, raw=True, alive=fuzz.alive)
    assert fuzz.alive(), "the sidecar died"
    assert not report.failures, "\n".join(report.failures[:10])


def test_rss_stays_bounded(target: tuple[FuzzTarget, Held]) -> None:
    """guarantee: bounded local resources — after every fuzzing run above (3 MB strings included), the sidecar's RSS
    is below its start plus 150 MB."""
    fuzz, _ = target
    assert fuzz.alive()
    assert fuzz.rss() < fuzz.started_rss + RSS_BOUND, f"{fuzz.rss() / 2**20:.0f} MB"
