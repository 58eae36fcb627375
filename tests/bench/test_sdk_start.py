"""The SDK baseline's saturation clock measures work, not start-up: every worker and its client exist before the
harness says "go" (each client makes an HTTP client and a TLS context: at N = 100 on a loaded machine, built inside
the window, they left no time for a single item)."""

from __future__ import annotations

import pytest

pytest.importorskip("anthropic")

from bench.baseline import SdkFleet


async def test_workers_and_clients_are_built_before_the_fleet_starts() -> None:
    fleet = SdkFleet("http://127.0.0.1:9", "env_unused", workers=3)
    try:
        fleet.prepare()
        assert len(fleet._workers) == 3 and len(fleet._clients) == 3
        assert not fleet._tasks, "prepare builds, it does not start: the clock starts at start()"
        clients = list(fleet._clients)
        await fleet.start()
        assert fleet._clients == clients, "start() reuses what prepare() built"
        assert len(fleet._tasks) == 3
    finally:
        await fleet.close()
