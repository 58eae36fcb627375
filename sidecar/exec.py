"""`work-sidecar exec`: run a command once per assigned item, supervised in the foreground.

    work-sidecar exec --sidecar unix:///tmp/work-sidecar.sock --max-in-flight 2 -- ./handle-session.sh

Parity with `ant beta:worker poll --on-work SCRIPT`: the child gets `ANTHROPIC_WORK_ID`,
`ANTHROPIC_ENVIRONMENT_ID`, `ANTHROPIC_SESSION_ID`, the item's session credential
(`ANTHROPIC_SESSION_TOKEN`, plus `ANTHROPIC_BASE_URL` when the secret names one), `TRACEPARENT` (always a valid
W3C traceparent: the item's trace when the sidecar traces, else a fresh random one), `WORK_SIDECAR_ADDR` and
`WORK_SIDECAR_LEASE_TOKEN` (to call the sidecar about its item itself: GetWork, UpdateWorkMetadata, KeepAlive),
and the work object as JSON on stdin (its `secret` is null, as in a GET; `state` active with `started_at` and
`latest_heartbeat_at` from the claim). Unlike a script that backgrounds the sandbox, the adapter keeps the child in
the foreground and the lease alive while it runs:

- the child exits → the item is stopped (a graceful stop, confirmed), and its exit code is reported;
- StopRequested → SIGTERM to the child (its exit then stops the item);
- LeaseLost → SIGTERM, then SIGKILL after `--kill-grace`; the item is not stopped (it is not ours);
- SIGTERM/SIGINT to the adapter → forwarded to every child; interrupted items are *not* stopped: the
  adapter disconnects and the sidecar releases them to the queue, so no work is lost. Exit 143 / 130.
- the sidecar restarts (crash, container update) → the children keep running; the adapter reconnects with
  backoff (for up to `--reconnect-timeout`) and resumes their leases on a new watch (`resume`): a sidecar
  restarted with its `--state-dir` carries on with them, one without reports them lost (→ SIGTERM);
- the sidecar cannot be reached for `--reconnect-timeout` (never, or no longer) → the adapter exits 1, naming
  the address: work it did not do is never reported as success;
- `--idle-exit S`: no item within S seconds while no child runs (the sidecar reached) → exit 0. With `--once`,
  a Job whose item went to another Job ends instead of waiting.

The child runs in its own process group; signals go to the whole group.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from ._address import ADDRESS_ALIASES, ADDRESS_ENV, CHANNEL_OPTIONS, add_sidecar_argument
from ._fencing import fence_margin
from ._flags import Flag, add_flags, resolve, values_of
from ._logging import LOG_FORMATS, configure_logging
from .client import _Reconnect, sidecar_unreachable
from .wire import WORK_TIMESTAMPS, work_object
from .work.v1 import work_service_pb2 as pb
from .work.v1 import work_service_pb2_grpc as pb_grpc

log = logging.getLogger("sidecar.exec")

IDLE_CHECK = 0.5
"""Seconds between two looks at whether --idle-exit has come."""

WORK_STATE_NAMES = {v: k.removeprefix("WORK_STATE_").lower() for k, v in pb.WorkState.items()}


def work_json(work: pb.Work) -> dict[str, Any]:
    """The Work API's JSON shape of an item (secret null)."""

    def when(ts: Timestamp, present: bool) -> str | None:
        return ts.ToDatetime().isoformat() + "Z" if present else None

    return work_object(
        id=work.id,
        environment_id=work.environment_id,
        data={"type": work.data.type, "id": work.data.id},
        state=work.raw_state or WORK_STATE_NAMES.get(work.state, "unspecified"),
        metadata=work.metadata,
        timestamps={name: when(getattr(work, name), work.HasField(name)) for name in WORK_TIMESTAMPS},
        secret=None,
    )


def random_traceparent() -> str:
    """A valid W3C traceparent for a fresh trace (version 00, random non-zero ids, sampled), for when the sidecar
    does not trace: the child can always parent its spans on `TRACEPARENT`."""
    trace_id = secrets.token_hex(16)
    span_id = secrets.token_hex(8)
    if int(trace_id, 16) == 0 or int(span_id, 16) == 0:  # all-zero ids are invalid (odds: 2**-64)
        return random_traceparent()
    return f"00-{trace_id}-{span_id}-01"


def child_environment(
    item: pb.WorkAssigned, sidecar: str, base: dict[str, str], auth_token: str | None = None
) -> dict[str, str]:
    env = dict(base)
    env.update(
        ANTHROPIC_WORK_ID=item.work.id,
        ANTHROPIC_ENVIRONMENT_ID=item.work.environment_id,
        ANTHROPIC_SESSION_ID=item.work.data.id,
        TRACEPARENT=item.traceparent or random_traceparent(),
        WORK_SIDECAR_ADDR=sidecar,
        WORK_SIDECAR_LEASE_TOKEN=item.lease_token,
    )
    for alias in ADDRESS_ALIASES:
        env.pop(alias, None)  # one name for the address in the child: WORK_SIDECAR_ADDR
    if item.session_credentials.sessions_token:
        env["ANTHROPIC_SESSION_TOKEN"] = item.session_credentials.sessions_token
    if item.session_credentials.api_base_url:
        env["ANTHROPIC_BASE_URL"] = item.session_credentials.api_base_url
    if auth_token:
        env["WORK_SIDECAR_AUTH_TOKEN"] = auth_token
    env.pop("WORK_SIDECAR_API_KEY", None)  # the environment key stays with the sidecar
    return env


@dataclass(eq=False)
class Child:
    item: pb.WorkAssigned
    process: asyncio.subprocess.Process
    lost: bool = False
    interrupted: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def work_id(self) -> str:
        return self.item.work.id

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)


class ExecAdapter:
    def __init__(self, args: argparse.Namespace, command: list[str]) -> None:
        self.args = args
        self.command = command
        self.metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {args.auth_token}"),) if args.auth_token else ()
        )
        self.children: dict[str, Child] = {}
        self.exit_codes: list[int] = []
        self.signalled: int | None = None
        self.completed = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._disconnected_since: float | None = None
        self.failed = False
        """The adapter could not go on (the sidecar unreachable, the watch refused): exit 1, whatever ran."""
        self.reached = False
        """A WatchWork stream stayed up at least once: the sidecar was reached."""
        self._idle_since = time.monotonic()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop_watching = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum, stop_watching)
        async with grpc.aio.insecure_channel(self.args.sidecar, options=CHANNEL_OPTIONS) as channel:
            self.stub = pb_grpc.WorkServiceStub(channel)
            self.sandbox_id = self.args.sandbox_id or f"exec:{socket.gethostname()}:{os.getpid()}"
            watcher = asyncio.ensure_future(self._reconnecting_watch(stop_watching))
            idle = asyncio.ensure_future(self._idle_exit(stop_watching)) if self.args.idle_exit is not None else None
            await stop_watching.wait()
            if idle is not None:
                idle.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await watcher
        if self.signalled is not None:
            return 128 + self.signalled
        if self.args.once and self.exit_codes:
            return self.exit_codes[-1]
        return 1 if self.failed else 0

    async def _idle_exit(self, stop_watching: asyncio.Event) -> None:
        """--idle-exit: stop watching once no item has come for that long while no child ran and the sidecar was
        reached (an unreachable sidecar is the reconnect timeout's business, and exits 1)."""
        limit = float(self.args.idle_exit)
        while True:
            if self.children or self._tasks or not self.reached or self._disconnected_since is not None:
                self._idle_since = time.monotonic()
            elif time.monotonic() - self._idle_since >= limit:
                log.info("no item came: exiting (--idle-exit)", extra={"idle_exit": limit})
                stop_watching.set()
                return
            await asyncio.sleep(min(IDLE_CHECK, limit))

    def _on_signal(self, signum: int, stop_watching: asyncio.Event) -> None:
        log.info("signal received: forwarding to children", extra={"signal": signal.Signals(signum).name})
        self.signalled = signum
        for child in self.children.values():
            child.interrupted = True
            child.signal(signum)
            self._spawn(self._kill_after_grace(child))
        stop_watching.set()

    async def _reconnecting_watch(self, stop_watching: asyncio.Event) -> None:
        """Watch; while the sidecar cannot be reached, reconnect with backoff and resume the running items."""
        reconnect = _Reconnect(self.args.reconnect_timeout)
        while True:
            began = time.monotonic()
            call = self.stub.WatchWork(
                pb.WatchWorkRequest(
                    max_in_flight=self.args.max_in_flight,
                    sandbox_id=self.sandbox_id,
                    max_items=1 if self.args.once else 0,  # --once is never handed a second item as it leaves
                    resume=[
                        pb.HeldLease(work_id=child.work_id, lease_token=child.item.lease_token)
                        for child in self.children.values()
                    ],
                ),
                metadata=self.metadata,
            )
            attached = asyncio.get_running_loop().call_later(1.0, self._attached)  # a stream that stays up
            try:
                error = await self._watch(call, stop_watching)
            finally:
                attached.cancel()
                call.cancel()
            if error is None or stop_watching.is_set():
                return
            if time.monotonic() - began > 1.0:
                reconnect.reached()
            if self._disconnected_since is None:
                self._disconnected_since = time.monotonic()
                for child in self.children.values():
                    self._spawn(self._fence(child, self._disconnected_since))
                log.warning(
                    "the sidecar at %s cannot be reached: reconnecting for up to %g s",
                    self.args.sidecar,
                    self.args.reconnect_timeout,
                    extra={"sidecar": self.args.sidecar, "error": error.details(), "children": len(self.children)},
                )
            try:
                await reconnect.wait(error)
            except grpc.aio.AioRpcError as exc:
                print(f"work-sidecar exec: {watch_failure(exc, self.args.sidecar)}", file=sys.stderr, flush=True)
                self.exit_codes.append(1)
                self.failed = True
                stop_watching.set()
                return

    async def _watch(self, call: Any, stop_watching: asyncio.Event) -> grpc.aio.AioRpcError | None:
        """One WatchWork stream; returns the error when the sidecar became unreachable (reconnect)."""
        try:
            async for event in call:
                self._on_event(event, stop_watching)
        except grpc.aio.AioRpcError as exc:
            if sidecar_unreachable(exc) and self.signalled is None and not (self.args.once and self.completed):
                return exc  # the children keep running; the caller reconnects
            if exc.code() != grpc.StatusCode.CANCELLED:
                log.error("WatchWork failed", extra={"code": exc.code().name, "error": exc.details()})
                # the adapter cannot go on: one plain line for the person at the terminal, naming the fix
                print(f"work-sidecar exec: {watch_failure(exc, self.args.sidecar)}", file=sys.stderr, flush=True)
                self.exit_codes.append(1)
                self.failed = True
        if not self._tasks:
            stop_watching.set()
        return None

    def _attached(self) -> None:
        self._disconnected_since = None
        self.reached = True

    async def _fence(self, child: Child, since: float) -> None:
        """While the sidecar cannot be reached nobody may renew the child's lease. It was renewed at most half a
        TTL before the disconnection, so the Work API may re-deliver the item from `since + ttl/2` on: unless the
        sidecar is back by then (less the fencing margin and the kill grace), the child is stopped as lost."""
        ttl = float(child.item.lease.ttl_seconds or 60)
        margin = fence_margin(ttl)
        await asyncio.sleep(max(0.0, since + ttl / 2 - margin - self.args.kill_grace - time.monotonic()))
        if self._disconnected_since != since or child.done.is_set() or child.lost:
            return
        child.lost = True
        log.warning("the sidecar is still unreachable: stopping the child before its lease can expire",
                    extra={"work_id": child.work_id})  # fmt: skip
        child.signal(signal.SIGTERM)
        await self._kill_after_grace(child)

    def _on_event(self, event: pb.WatchWorkResponse, stop_watching: asyncio.Event) -> None:
        kind = event.WhichOneof("event")
        if kind == "work_assigned":
            if self.signalled is None:  # else the sidecar releases it when we disconnect
                self._spawn(self._run_item(event.work_assigned, stop_watching))
        elif kind == "stop_requested":
            if child := self.children.get(event.stop_requested.work_id):
                log.info("stop requested: SIGTERM to the child", extra={"work_id": child.work_id})
                child.signal(signal.SIGTERM)
        elif kind == "lease_lost":
            if child := self.children.get(event.lease_lost.work_id):
                child.lost = True
                reason = pb.LeaseLostReason.Name(event.lease_lost.reason)
                log.warning("lease lost: stopping the child", extra={"work_id": child.work_id, "reason": reason})
                child.signal(signal.SIGTERM)
                self._spawn(self._kill_after_grace(child))
        elif kind == "draining":
            log.info("the sidecar is draining: finishing the running items")
            if not self.children:
                stop_watching.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _kill_after_grace(self, child: Child) -> None:
        try:
            await asyncio.wait_for(child.done.wait(), self.args.kill_grace)
        except TimeoutError:
            log.warning("child did not exit in time: SIGKILL", extra={"work_id": child.work_id})
            child.signal(signal.SIGKILL)

    async def _run_item(self, item: pb.WorkAssigned, stop_watching: asyncio.Event) -> None:
        env = child_environment(item, self.args.sidecar, dict(os.environ), self.args.auth_token)
        process = await asyncio.create_subprocess_exec(
            *self.command, stdin=asyncio.subprocess.PIPE, env=env, start_new_session=True
        )
        child = Child(item, process)
        self.children[child.work_id] = child
        log.info("child started", extra={"work_id": child.work_id, "pid": process.pid})
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            process.stdin.write(json.dumps(work_json(item.work)).encode() + b"\n")
            await process.stdin.drain()
            process.stdin.close()
        returned = await process.wait()
        code = returned if returned >= 0 else 128 - returned  # killed by signal N: 128 + N, as shells do
        child.done.set()
        del self.children[child.work_id]
        self.exit_codes.append(code)
        log.info("child exited", extra={"work_id": child.work_id, "exit_code": code})
        if child.lost:
            pass  # not ours any more: no stop
        elif child.interrupted:
            log.info("interrupted: leaving the item to be released to the queue", extra={"work_id": child.work_id})
        else:
            await self._stop(child)
        self.completed += 1
        if self.args.once or (self.signalled is not None and not self.children):
            stop_watching.set()

    async def _stop(self, child: Child) -> None:
        request = pb.StopWorkRequest(work_id=child.work_id, lease_token=child.item.lease_token)
        reconnect = _Reconnect(self.args.reconnect_timeout)

        async def stop() -> pb.StopWorkResponse:
            while True:  # the sidecar may be restarting: it knows the lease again once it is back
                try:
                    response: pb.StopWorkResponse = await self.stub.StopWork(request, metadata=self.metadata)
                    return response
                except grpc.aio.AioRpcError as exc:
                    if not sidecar_unreachable(exc):
                        raise
                    await reconnect.wait(exc)

        try:
            response = await stop()
            if response.work.state == pb.WORK_STATE_STOPPING:  # a graceful stop was requested: confirm it
                response = await stop()
            log.info("item stopped", extra={"work_id": child.work_id, "state": WORK_STATE_NAMES[response.work.state]})
        except grpc.aio.AioRpcError as exc:
            log.error("stop failed", extra={"work_id": child.work_id, "code": exc.code().name, "error": exc.details()})


def watch_failure(exc: grpc.aio.AioRpcError, address: str) -> str:
    """What went wrong with the watch, and what to do about it."""
    code = exc.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return (
            f"cannot reach the sidecar at {address} ({exc.details()}): start it (work-sidecar serve), or point "
            f"--sidecar / {ADDRESS_ENV} at it; check with: work-sidecar health --sidecar {address}"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"the sidecar wants a bearer token: pass --auth-token or set WORK_SIDECAR_AUTH_TOKEN ({exc.details()})"
    return f"WatchWork failed: {code.name}: {exc.details()}"


EPILOG = f"""\
environment:
  {ADDRESS_ENV}        the sidecar's address when --sidecar is not given ({", ".join(ADDRESS_ALIASES)} is an alias)
  WORK_SIDECAR_AUTH_TOKEN  the bearer token when --auth-token is not given

the child gets:
  ANTHROPIC_WORK_ID, ANTHROPIC_ENVIRONMENT_ID, ANTHROPIC_SESSION_ID
  ANTHROPIC_SESSION_TOKEN  the item's session credential (a secret); ANTHROPIC_BASE_URL when the secret names one
  TRACEPARENT              a valid W3C traceparent (the item's trace, or a fresh one when the sidecar does not trace)
  {ADDRESS_ENV}        the sidecar's address, to call it about the item (GetWork, UpdateWorkMetadata, KeepAlive)
  WORK_SIDECAR_LEASE_TOKEN the item's lease token, needed on every such call (a secret: never log it)
  stdin                    the work object as JSON (secret null)
The environment key (WORK_SIDECAR_API_KEY) is never passed on.

  work-sidecar exec --sidecar unix:///tmp/work-sidecar.sock --max-in-flight 2 -- ./handle-session.sh
"""


EXEC_FLAGS: tuple[Flag, ...] = (
    Flag("--max-in-flight", "children running at once", type=int, default=1, variables=(), metavar="N"),
    Flag("--sandbox-id", "this sandbox's name in the sidecar's logs (default: exec:HOST:PID)", default="",
         variables=(), metavar="ID"),
    Flag("--auth-token", "bearer token, when the sidecar was started with one", secret=True, metavar="TOKEN"),
    Flag("--kill-grace", "seconds between SIGTERM and SIGKILL when a lease is lost or the adapter is stopped",
         type=float, default=10.0, variables=(), metavar="S"),
    Flag("--once", "exit after one item, with the child's exit code", switch=True),
    Flag("--idle-exit", "exit 0 when no item came within S seconds while no child ran (with --once: a Job that "
         "found no item ends; default: wait for ever)", type=float, variables=(), metavar="S"),
    Flag("--reconnect-timeout", "seconds to keep reconnecting to an unreachable (restarting) sidecar; the children "
         "keep running", type=float, default=60.0, variables=(), metavar="S"),
    Flag("--log-format", "the adapter's own log lines: auto (text on a TTY, else JSON), json or text",
         default="auto", choices=LOG_FORMATS, variables=()),
)  # fmt: skip
"""`exec`'s flags besides `--sidecar` (which `health` shares, `add_sidecar_argument`)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="work-sidecar exec",
        usage="work-sidecar exec [--sidecar ADDR] [options] -- COMMAND [ARGS...]",
        description=(
            "Run COMMAND once per item the sidecar assigns, in the foreground, keeping the item's lease alive\n"
            "while it runs; the child's exit stops the item. Everything after -- is the command and its arguments."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sidecar_argument(parser)
    add_flags(parser, EXEC_FLAGS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1 :]
    else:
        own, command = argv, []
    parser = build_parser()
    args, unknown = parser.parse_known_args(own)
    vars(args).update(values_of(resolve(args, EXEC_FLAGS, os.environ, prog="work-sidecar exec")))
    if unknown:
        hint = "" if command else f"; put the command after --: work-sidecar exec [options] -- {' '.join(unknown)}"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    if not args.sidecar:
        parser.error(
            f"--sidecar is required: pass --sidecar unix:///path or host:port, or set {ADDRESS_ENV} "
            f"(e.g. {ADDRESS_ENV}=unix:///tmp/work-sidecar.sock)"
        )
    if not command:
        parser.error("give the command after --: work-sidecar exec --sidecar ADDR -- COMMAND [ARGS...]")
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1 (the children that may run at once)")
    if args.kill_grace < 0:
        parser.error("--kill-grace must be 0 or more seconds")
    if args.idle_exit is not None and args.idle_exit <= 0:
        parser.error("--idle-exit must be more than 0 seconds")
    configure_logging(fmt=args.log_format, secrets=[args.auth_token])
    return asyncio.run(ExecAdapter(args, command).run())
