"""An example sandbox in Python that uses only the generated gRPC stubs (no helper library).

It watches for work, keeps each lease alive with KeepAlive, "works" for a moment, and stops the item,
printing every step. Sandboxes in other languages do exactly the same with their own generated stubs.

    python examples/python/sandbox.py --sidecar unix:///tmp/work-sidecar.sock --items 3
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator

import grpc

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc


def say(text: str) -> None:
    print(f"[sandbox] {text}", flush=True)


async def keep_alive(stub: pb_grpc.WorkServiceStub, item: pb.WorkAssigned, every: float) -> None:
    """Ping the lease and print every status the sidecar sends back."""

    async def pings() -> AsyncIterator[pb.KeepAliveRequest]:
        while True:
            yield pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token)
            await asyncio.sleep(every)

    async for response in stub.KeepAlive(pings()):
        lease = response.lease
        say(
            f"  keepalive {lease.work_id}: {pb.LeaseState.Name(lease.state)} "
            f"ttl={lease.ttl_seconds}s expires={lease.expires_at.ToDatetime().time().isoformat('seconds')}"
        )


async def work_on(stub: pb_grpc.WorkServiceStub, item: pb.WorkAssigned, seconds: float, done: asyncio.Event) -> None:
    work = item.work
    say(f"assigned {work.id} (session {work.data.id}), lease ttl {item.lease.ttl_seconds}s")
    if item.session_credentials.sessions_token:
        say("  got the session credential for this item (not printed: it is a secret)")
    pinger = asyncio.ensure_future(keep_alive(stub, item, every=max(seconds / 2, 0.5)))
    try:
        await asyncio.wait_for(done.wait(), timeout=seconds)
        say(f"  {work.id}: finishing early")
    except TimeoutError:
        pass
    finally:
        pinger.cancel()
    try:
        response = await stub.StopWork(pb.StopWorkRequest(work_id=work.id, lease_token=item.lease_token, force=True))
        say(f"stopped {work.id}: state {pb.WorkState.Name(response.work.state)}")
    except grpc.aio.AioRpcError as exc:
        say(f"stop {work.id} failed: {exc.code().name}: {exc.details()}")


async def _events(call: grpc.aio.UnaryStreamCall) -> AsyncIterator[pb.WatchWorkResponse]:
    """The watch's events until the stream ends or we cancel it."""
    try:
        async for event in call:
            yield event
    except asyncio.CancelledError:
        return
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            raise


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecar", default="unix:///tmp/work-sidecar.sock")
    parser.add_argument("--sandbox-id", default="example-python")
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--items", type=int, default=0, help="exit after this many items (0: run until stopped)")
    parser.add_argument("--work-seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    async with grpc.aio.insecure_channel(args.sidecar) as channel:
        stub = pb_grpc.WorkServiceStub(channel)
        say(f"watching {args.sidecar} as {args.sandbox_id} (max_in_flight={args.max_in_flight})")
        call = stub.WatchWork(
            pb.WatchWorkRequest(
                max_in_flight=args.max_in_flight,
                sandbox_id=args.sandbox_id,
                max_items=args.items,  # never handed an item more than it will take before it leaves
            )
        )
        tasks: set[asyncio.Task[None]] = set()
        stops: dict[str, asyncio.Event] = {}
        seen = 0

        async def finish_then_leave() -> None:
            # Keep the watch open until the last item is stopped: the open stream is what keeps the
            # leases of this sandbox alive, and it carries StopRequested / LeaseLost for them.
            await asyncio.gather(*tasks)
            call.cancel()

        async for event in _events(call):
            kind = event.WhichOneof("event")
            if kind == "work_assigned":
                seen += 1
                stops[event.work_assigned.work.id] = asyncio.Event()
                task = asyncio.ensure_future(
                    work_on(stub, event.work_assigned, args.work_seconds, stops[event.work_assigned.work.id])
                )
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                if args.items and seen == args.items:
                    leaving = asyncio.ensure_future(finish_then_leave())
            elif kind == "stop_requested":
                say(f"stop requested for {event.stop_requested.work_id}")
                if found := stops.get(event.stop_requested.work_id):
                    found.set()
            elif kind == "lease_lost":
                lost = event.lease_lost
                say(f"lease lost for {lost.work_id}: {pb.LeaseLostReason.Name(lost.reason)} ({lost.message})")
            elif kind == "draining":
                say("the sidecar is draining: no new work will come")
        if args.items and seen >= args.items:
            await leaving
    say(f"done: {seen} item(s)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
