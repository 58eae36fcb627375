"""A sandbox as its own process, written only with the generated stubs: `python -m chaos.sandbox TARGET …`.

It watches, holds each assigned item for `--hold` seconds (pinging KeepAlive with `--keepalive`), then calls
`StopWork(force=true)`; `StopRequested` stops the item at once; `LeaseLost` abandons it (no stop: it is not ours).
With `--reattach` it
outlives its sidecar: when the stream ends it opens a new one on the same address and resumes every lease it holds
(`WatchWorkRequest.resume`), and a `StopWork` or `KeepAlive` that finds no sidecar is tried again, as a sandbox
beside a sidecar with `--state-dir` does.
Every event is one JSON line on stdout with the wall-clock time, for the invariant checks:
`{"ev": "assigned" | "lost" | "stop_requested" | "stopping" | "stopped" | "stop_error" | "draining" | "watch_end" |
"resuming", "work_id", "t", …}`; `stopping` is written when the work is done, before `StopWork`.
Lease tokens go only to `--token-file` (so the harness can check that no output anywhere contains one); this
process never prints a secret or a token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import grpc

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc


def emit(ev: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"ev": ev, "t": time.time(), **fields}) + "\n")
    sys.stdout.flush()


class Sandbox:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lost: dict[str, asyncio.Event] = {}  # set on LeaseLost or StopRequested: the hold ends
        self.heard_lost: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.held: dict[str, str] = {}  # work id -> lease token, while the work runs (resumed after a restart)
        self.draining = False

    async def run(self) -> None:
        # A sandbox that outlives its sidecar finds the next one within a few tenths of a second (gRPC's default
        # reconnect backoff grows to two minutes).
        quick = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 300),
        ]
        async with grpc.aio.insecure_channel(
            self.args.target, options=quick if self.args.reattach else None
        ) as channel:
            stub: Any = pb_grpc.WorkServiceStub(channel)
            given = 0
            while True:
                code, given = await self.watch(stub, given)
                emit("watch_end", code=code)
                if not self.args.reattach or (self.args.max_items and given >= self.args.max_items and not self.held):
                    break
                await asyncio.sleep(0.1)
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)

    async def watch(self, stub: Any, given: int) -> tuple[str, int]:
        """One WatchWork stream (resuming the leases held, if any); its end's code and the items given so far."""
        resume = [pb.HeldLease(work_id=w, lease_token=t) for w, t in self.held.items()]
        request = pb.WatchWorkRequest(
            max_in_flight=self.args.max_in_flight,
            sandbox_id=self.args.sandbox_id,
            max_items=self.args.max_items,
            resume=resume,
        )
        if resume:
            emit("resuming", work_ids=[r.work_id for r in resume])
        call = stub.WatchWork(request)
        code = "OK"
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "work_assigned":
                    given += 1
                    item = event.work_assigned
                    emit("assigned", work_id=item.work.id, ttl=item.lease.ttl_seconds)
                    if self.args.token_file:
                        with open(self.args.token_file, "a") as out:
                            out.write(item.lease_token + "\n")
                    self.lost[item.work.id] = asyncio.Event()
                    self.heard_lost.discard(item.work.id)  # the same item again, after it came back
                    self.held[item.work.id] = item.lease_token
                    task = asyncio.ensure_future(self.work(stub, item.work.id, item.lease_token))
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)
                elif kind == "lease_lost":
                    lost_id = event.lease_lost.work_id
                    if lost_id in self.heard_lost or lost_id not in self.held:
                        continue  # already over (a resumed lease the sidecar no longer knows, told again)
                    emit("lost", work_id=lost_id, reason=int(event.lease_lost.reason))
                    self.heard_lost.add(lost_id)
                    if found := self.lost.get(lost_id):
                        found.set()
                elif kind == "stop_requested":
                    emit("stop_requested", work_id=event.stop_requested.work_id)
                    if found := self.lost.get(event.stop_requested.work_id):
                        found.set()  # ends the hold early; work() then stops it
                elif kind == "draining":
                    emit("draining")
                    self.draining = True
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        return code, given

    async def work(self, stub: Any, work_id: str, token: str) -> None:
        lost = self.lost[work_id]
        pinger = asyncio.ensure_future(self.keep_alive(stub, work_id, token)) if self.args.keepalive else None
        try:
            if self.args.reads:
                await self.reads(stub, work_id, token)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lost.wait(), None if self.args.hold < 0 else self.args.hold)
        finally:
            if pinger is not None:
                pinger.cancel()
        if work_id in self.heard_lost:
            self.held.pop(work_id, None)
            return  # LeaseLost: not ours to stop
        emit("stopping", work_id=work_id)  # the work is done: from here on nothing runs on the item
        deadline = time.monotonic() + 30
        while True:
            try:
                await stub.StopWork(pb.StopWorkRequest(work_id=work_id, lease_token=token, force=True), timeout=30)
                emit("stopped", work_id=work_id)
                break
            except grpc.aio.AioRpcError as exc:
                if self.args.reattach and exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)  # no sidecar at the moment: a restarted one takes the stop
                    continue
                emit("stop_error", work_id=work_id, code=exc.code().name)
                break
        self.held.pop(work_id, None)

    async def reads(self, stub: Any, work_id: str, token: str) -> None:
        """The other RPCs a sandbox uses while it works; any failure is noted with its status code."""
        calls = [
            ("GetWork", lambda: stub.GetWork(pb.GetWorkRequest(work_id=work_id, lease_token=token), timeout=30)),
            (
                "UpdateWorkMetadata",
                lambda: stub.UpdateWorkMetadata(
                    pb.UpdateWorkMetadataRequest(work_id=work_id, lease_token=token, set={"chaos": "1"}), timeout=30
                ),
            ),
            ("ListWork", lambda: stub.ListWork(pb.ListWorkRequest(page_size=5), timeout=30)),
            ("GetQueueStats", lambda: stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=30)),
        ]
        for rpc, call in calls:
            try:
                await call()  # type: ignore[no-untyped-call]  # the lambdas of a list of mixed calls
            except grpc.aio.AioRpcError as exc:
                emit("rpc_error", work_id=work_id, rpc=rpc, code=exc.code().name)

    async def keep_alive(self, stub: Any, work_id: str, token: str) -> None:
        async def pings() -> Any:
            while True:
                yield pb.KeepAliveRequest(work_id=work_id, lease_token=token)
                await asyncio.sleep(0.5)

        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                call: Any = stub.KeepAlive(pings())
                async for status in call:
                    if status.lease.state == pb.LEASE_STATE_LOST and work_id not in self.heard_lost:
                        emit("lost", work_id=work_id, via="keepalive")
                        self.heard_lost.add(work_id)
                        self.lost[work_id].set()
            if not self.args.reattach or work_id in self.heard_lost:
                return
            await asyncio.sleep(0.1)  # the sidecar went away: ping the next one


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.sandbox")
    parser.add_argument("target")
    parser.add_argument("--sandbox-id", default="chaos")
    parser.add_argument("--max-in-flight", type=int, default=1)
    parser.add_argument("--max-items", type=int, default=0)
    parser.add_argument("--hold", type=float, default=1.0, help="seconds to hold each item (-1: until lost)")
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument("--reads", action="store_true", help="GetWork, UpdateWorkMetadata, ListWork, GetQueueStats")
    parser.add_argument("--token-file", default=None)
    parser.add_argument("--reattach", action="store_true", help="outlive the sidecar: reconnect and resume leases")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(Sandbox(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
