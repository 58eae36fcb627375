"""The scenario matrix. Each scenario gets its own environment and a fresh `work-sidecar serve` behind the fault
proxy, three sandbox processes and a trickle of items; it injects its faults for `phase` seconds, then the settle
phase clears every fault and lets a healthy sandbox finish whatever is left; then the invariants are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

from . import invariants
from .harness import KEY, Emulator, Processes, SandboxProc, Sidecar, wait_for
from .proxy import MUTATIONS, Event, Proxy, Rule

TTL = 4  # the sidecar's --ttl: renewals every 2 s, so faults hit many renewals in a short phase
MIN_TTL, MAX_TTL, DEFAULT_TTL = 1, 600, 60


@dataclass
class Context:
    name: str
    env: str
    emulator: Emulator
    proxy: Proxy
    procs: Processes
    phase: float
    seed: int
    quick: bool
    sidecars: list[Sidecar] = field(default_factory=list)
    sandboxes: list[SandboxProc] = field(default_factory=list)
    item_ids: list[str] = field(default_factory=list)
    stolen: dict[str, float] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_flags: list[str] = field(default_factory=list)
    rng: random.Random = field(default_factory=random.Random)
    ttl: int = TTL
    state_dir: bool = False
    """Every sidecar of the scenario on one `--state-dir` and one socket (a restart takes over its predecessor's)."""
    reattach: bool = False
    """Sandboxes outlive their sidecar (`chaos.sandbox --reattach`)."""
    _n: int = 0

    @property
    def sidecar(self) -> Sidecar:
        return self.sidecars[-1]

    async def start_sidecar(self) -> Sidecar:
        extra, listen = list(self.extra_flags), None
        if self.state_dir:
            extra += ["--state-dir", str(self.procs.directory / f"state-{self.env}")]
            listen = f"unix://{self.procs.directory}/{self.env}.sock"
        sidecar = await Sidecar.start(
            self.procs, self.proxy.url or "", self.env, ttl=self.ttl, extra=extra, listen=listen
        )
        self.sidecars.append(sidecar)
        return sidecar

    def start_sandbox(self, **kwargs: Any) -> SandboxProc:
        self._n += 1
        kwargs.setdefault("reattach", self.reattach)
        sandbox = SandboxProc.start(self.procs, self.sidecar.target, f"{self.env}-sb{self._n}", **kwargs)
        self.sandboxes.append(sandbox)
        return sandbox

    async def enqueue(self, count: int = 1) -> None:
        self.item_ids += await self.emulator.enqueue(self.env, count)

    async def active_items(self) -> list[str]:
        return [i["id"] for i in await self.emulator.items(self.env) if i["state"] == "active"]


Action = Callable[[Context], Awaitable[None]]


@dataclass
class Scenario:
    name: str
    what: str
    action: Action
    sandboxes: int = 3
    hold: float = 5.0  # > 2 renewal intervals: faults on renewals hit held items
    keepalive: bool = False
    full_only: bool = False
    min_phase: float = 0.0
    extra_flags: list[str] = field(default_factory=list)
    ttl: int = TTL
    state_dir: bool = False
    reattach: bool = False


async def during(ctx: Context, step: Callable[[], Awaitable[None]], every: float) -> None:
    """Run `step` every `every` seconds until the phase ends."""
    deadline = time.monotonic() + ctx.phase
    while time.monotonic() < deadline:
        await step()
        await asyncio.sleep(min(every, max(0.0, deadline - time.monotonic())))


async def phase_of(ctx: Context) -> None:
    await asyncio.sleep(ctx.phase)


def rules(*specs: dict[str, Any]) -> Action:
    async def act(ctx: Context) -> None:
        added = [ctx.proxy.add(Rule(duration=ctx.phase, **spec)) for spec in specs]
        await phase_of(ctx)
        for rule in added:
            ctx.proxy.remove(rule)

    return act


def cycle(operation: str, mutations: list[str], every: float = 1.0) -> Action:
    """One answer of `operation` per `every` seconds replaced by the next hostile mutation."""

    async def act(ctx: Context) -> None:
        index = 0

        async def step() -> None:
            nonlocal index
            mutation = mutations[index % len(mutations)]
            index += 1
            if mutation.startswith("huge:"):
                ctx.proxy.add(operation=operation, action="huge", size=int(mutation[5:]), count=1, duration=ctx.phase)
            elif mutation.startswith("drip"):
                ctx.proxy.add(operation=operation, action="drip", interval=1.0, count=1, duration=ctx.phase)
            else:
                ctx.proxy.add(operation=operation, action="mutate", mutation=mutation, count=1, duration=ctx.phase)

        await during(ctx, step, every)

    return act


def cycle_operations(operations: list[str], mutations: list[str], every: float = 0.5) -> Action:
    """Like `cycle`, over several operations in turn."""

    async def act(ctx: Context) -> None:
        index = 0

        async def step() -> None:
            nonlocal index
            operation, mutation = operations[index % len(operations)], mutations[index % len(mutations)]
            index += 1
            ctx.proxy.add(operation=operation, action="mutate", mutation=mutation, count=2, duration=ctx.phase)

        await during(ctx, step, every)

    return act


async def fuzzed(ctx: Context) -> None:
    """Random answers: any endpoint, any mutation or fault, seeded."""
    names = sorted(MUTATIONS)
    operations = ["poll", "ack", "claim", "renew", "stop", "get", "update", "list", "stats"]

    async def step() -> None:
        operation = ctx.rng.choice(operations)
        kind = ctx.rng.random()
        if kind < 0.6:
            ctx.proxy.add(operation=operation, action="mutate", mutation=ctx.rng.choice(names), count=1, duration=10)
        elif kind < 0.8:
            ctx.proxy.add(
                operation=operation,
                action="status",
                status=ctx.rng.choice([400, 404, 409, 412, 500, 502]),
                count=1,
                duration=10,
            )
        else:
            ctx.proxy.add(
                operation=operation, action="drop", forward_first=ctx.rng.random() < 0.5, count=1, duration=10
            )

    await during(ctx, step, 0.5)


async def theft(ctx: Context) -> None:
    """Lease theft: the emulator's admin steals an active item; a rival client heartbeats another itself."""
    async with httpx.AsyncClient(base_url=ctx.emulator.url, timeout=10) as rival:
        turn = 0

        async def step() -> None:
            nonlocal turn
            turn += 1
            active = [w for w in await ctx.active_items() if w not in ctx.stolen]
            if not active:
                return
            work_id = ctx.rng.choice(active)
            if turn % 2:
                if await ctx.emulator.steal(ctx.env, work_id) is not None:
                    ctx.stolen[work_id] = time.time()
                return
            view = await ctx.emulator.item(ctx.env, work_id)
            expected = view.get("last_heartbeat") or "NO_HEARTBEAT"
            headers = {
                "x-api-key": KEY,
                "anthropic-version": "2023-06-01",
                "anthropic-beta": "managed-agents-2026-04-01",
                "anthropic-worker-id": "rival",
            }
            at = time.time()
            answer = await rival.post(
                f"/v1/environments/{ctx.env}/work/{work_id}/heartbeat",
                params={"expected_last_heartbeat": expected, "desired_ttl_seconds": "2"},
                headers=headers,
            )
            if answer.status_code == 200:
                ctx.stolen[work_id] = at
            elif answer.status_code != 412:  # 412: the sidecar renewed between our read and our heartbeat: no theft
                ctx.errors.append(f"rival heartbeat answered {answer.status_code}: {answer.text[:200]}")

        await during(ctx, step, 1.5)


async def kill9(ctx: Context) -> None:
    """kill -9 a sandbox holding work, start a fresh one."""

    async def step() -> None:
        alive = [s for s in ctx.sandboxes if s.child.alive()]
        if alive:
            ctx.rng.choice(alive).child.kill()
        ctx.start_sandbox(hold=3.0, keepalive=ctx.rng.random() < 0.5)

    await during(ctx, step, 2.0)


async def keepalive_flood(ctx: Context) -> None:
    """A client that pings KeepAlive for a lease of its own as fast as it can and never reads the answers."""
    baseline = ctx.sidecar.child.rss()
    peak = baseline
    # No BDP probing and a 1 KiB lookahead: the client's gRPC core itself stops taking answers it is not asked for,
    # as a client that pings and never reads does (else the answers pile up in this process, not the sidecar).
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    async with grpc.aio.insecure_channel(ctx.sidecar.target, options=options) as channel:
        stub = pb_grpc.WorkServiceStub(channel)
        watch = stub.WatchWork(pb.WatchWorkRequest(max_in_flight=1, sandbox_id="flooder"))
        await ctx.enqueue(1)
        assigned: pb.WorkAssigned | None = None
        with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError):
            async with asyncio.timeout(30):
                async for event in watch:
                    if event.WhichOneof("event") == "work_assigned":
                        assigned = event.work_assigned
                        break
        if assigned is None:
            ctx.errors.append("the flooder never got an item")
            return
        ctx.excluded.add(assigned.work.id)  # not a sandbox that works: its item is released when it leaves
        request = pb.KeepAliveRequest(work_id=assigned.work.id, lease_token=assigned.lease_token)
        call = stub.KeepAlive()
        deadline = time.monotonic() + ctx.phase
        sent = 0
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError, TimeoutError):
            while time.monotonic() < deadline:
                # A write that blocks for 5 s: the sidecar cut this stream and stopped reading it (the status waits
                # behind the answers this client never reads, as HTTP/2 trailers do).
                await asyncio.wait_for(call.write(request), 5)
                sent += 1
                if sent % 2000 == 0:
                    peak = max(peak, ctx.sidecar.child.rss())
        peak = max(peak, ctx.sidecar.child.rss())
        call.cancel()
        watch.cancel()
    growth = (peak - baseline) / 2**20
    note = f"KeepAlive flood: {sent} pings unread, sidecar RSS +{growth:.0f} MB"
    if growth > 64:
        ctx.errors.append(note + " (bound: 64 MB)")
    else:
        ctx.notes.append(note)


async def sigterm(ctx: Context) -> None:
    """SIGTERM the sidecar mid-work: it drains (its sandboxes finish and stop); a new sidecar takes over."""
    await asyncio.sleep(ctx.phase / 2)
    old = ctx.sidecar
    old.child.signal(signal.SIGTERM)
    code = await old.child.wait(30)
    if code != 0:
        ctx.errors.append(f"the sidecar exited with {code} after SIGTERM (expected 0 after draining)")
    await ctx.start_sidecar()
    for _ in range(3):
        ctx.start_sandbox(hold=1.5)
    await asyncio.sleep(ctx.phase / 2)


def other_signal(signum: int) -> Action:
    async def act(ctx: Context) -> None:
        await asyncio.sleep(ctx.phase / 2)
        old = ctx.sidecar
        old.child.signal(signum)
        await asyncio.sleep(2.0)
        if not old.child.alive():
            ctx.errors.append(
                f"{signal.Signals(signum).name} killed the sidecar (exit {old.child.popen.poll()}) without draining"
            )
            await ctx.start_sidecar()
            for _ in range(3):
                ctx.start_sandbox(hold=1.5)
        await asyncio.sleep(ctx.phase / 2)

    return act


async def claim_outage(ctx: Context) -> None:
    """Every claiming heartbeat fails (503) for 35 s: acked items must not be left `starting`."""
    rule = ctx.proxy.add(operation="claim", action="status", status=503, duration=35)
    await asyncio.sleep(max(ctx.phase, 36))
    ctx.proxy.remove(rule)


EVERY_OPERATION = [
    "renew", "poll", "claim", "renew", "ack", "stop", "renew", "get", "update", "renew", "list", "stats", "claim",
]  # fmt: skip
"""Every operation, the lease's own (renewal, claim) most often: 13, coprime with the fault lists' lengths."""

LOST: list[dict[str, Any]] = [
    {"action": "drop", "forward_first": True},  # the connection closes before the answer
    {"action": "hang", "forward_first": True},  # no answer until the sidecar gives up
    {"action": "late", "interval": 16.0},  # the answer after the longest attempt deadline (15 s)
    {"action": "mutate", "mutation": "truncated"},  # the answer cut off half-way
]
"""An answer lost after the Work API applied its request."""

STRAY: list[dict[str, Any]] = [
    {"action": "twice"},  # the answer, then a stray `200 {}` read as the answer to the connection's next request
    {"action": "body", "body": "{}", "status": 200, "forward_first": True},  # a stray `200 {}` instead of the answer
    {"action": "twice", "stray": "now"},  # the answer and a stray `200 {}` in one burst
    {"action": "framing", "framing": "cl_chunked"},
    {"action": "mutate", "mutation": "garbage"},
    {"action": "framing", "framing": "two_cl"},
    {"action": "framing", "framing": "cl_short"},
    {"action": "header_block", "size": 1 << 20},
]
"""An answer that does not belong to its request (or has no clear end), after the Work API applied the request."""

RESETS: list[dict[str, Any]] = [{"action": "reset", "forward_first": True}, {"action": "reset"}]
"""A load balancer resets a kept-alive connection as the client reuses it: after or before the request went on."""


def after_apply(
    faults: list[dict[str, Any]],
    operations: list[str] = EVERY_OPERATION,
    every: float = 0.4,
    extra: list[dict[str, Any]] | None = None,
) -> Action:
    """Once an item is active, every `every` seconds the next request of the next operation meets the next fault
    (all pairs in turn: the two lists' lengths are coprime); `extra` rules hold for the whole phase."""

    async def act(ctx: Context) -> None:
        index = 0
        for spec in extra or []:
            ctx.proxy.add(Rule(duration=ctx.phase, **spec))

        async def step() -> None:
            nonlocal index
            operation, fault = operations[index % len(operations)], faults[index % len(faults)]
            index += 1
            ctx.proxy.add(operation=operation, count=1, duration=ctx.phase, **fault)

        await wait_for(ctx.active_items, timeout=20, interval=0.2)  # faults on leases need leases first
        await during(ctx, step, every)

    return act


async def crash_loop(ctx: Context) -> None:
    """kill -9 the sidecar every few seconds; a new one starts on the same `--state-dir` and socket at once."""

    async def step() -> None:
        old = ctx.sidecar
        old.child.kill()
        try:
            await ctx.start_sidecar()
        except RuntimeError as exc:
            ctx.errors.append(f"a restarted sidecar did not serve: {str(exc)[-300:]}")
            raise

    await wait_for(ctx.active_items, timeout=20, interval=0.2)  # the first kill finds leases to carry over
    await asyncio.sleep(1.0)
    await during(ctx, step, 4.0)


SCENARIOS: list[Scenario] = [
    Scenario("baseline", "no faults", phase_of),
    Scenario(
        "storm-5xx", "half of all requests answer 503", rules({"action": "status", "status": 503, "probability": 0.5})
    ),
    Scenario(
        "storm-429",
        "half of all requests answer 429 (retry-after-ms 300)",
        rules({"action": "status", "status": 429, "retry_after_ms": 300, "probability": 0.5}),
    ),
    Scenario(
        "drops",
        "30 % of requests reach the API but their connection drops before the answer",
        rules({"action": "drop", "forward_first": True, "probability": 0.3}),
    ),
    Scenario("latency", "1 s latency on every request", rules({"action": "pass", "latency": 1.0})),
    Scenario(
        "hangs",
        "20 % of heartbeats and acks (sent on) and every 3rd poll hang",
        rules(
            {"operation": "heartbeat", "action": "hang", "probability": 0.2, "forward_first": True},
            {"operation": "ack", "action": "hang", "probability": 0.2, "forward_first": True},
            {"operation": "poll", "action": "hang", "probability": 0.33},
        ),
    ),
    Scenario(
        "drips",
        "poll and heartbeat answers drip 1 byte/s",
        rules(
            {"operation": "poll", "action": "drip", "interval": 1.0, "probability": 0.3},
            {"operation": "renew", "action": "drip", "interval": 1.0, "probability": 0.2},
        ),
    ),
    Scenario(
        "hostile-heartbeat",
        "renewal answers: ttl NaN/Infinity/1e20/true/string, deep nesting, missing fields",
        cycle(
            "renew",
            [
                "ttl_nan",
                "ttl_inf",
                "ttl_huge",
                "ttl_true",
                "deep",
                "ttl_string",
                "last_heartbeat_missing",
                "ttl_neg_inf",
                "deep_field",
                "extended_string",
                "garbage",
                "truncated",
            ],
            every=1.0,
        ),
        hold=12.0,  # three TTLs: a renewal that silently died leaves the sandbox holding an expired lease
    ),
    Scenario(
        "hostile-claim",
        "claiming heartbeat answers replaced by hostile ones",
        cycle("claim", ["ttl_nan", "deep", "garbage", "ttl_huge", "last_heartbeat_missing", "truncated"], every=1.5),
    ),
    Scenario(
        "hostile-poll",
        "poll answers: deep nesting, invalid/missing ids, wrong types, garbage, 300 MB body, drip",
        cycle(
            "poll",
            [
                "deep",
                "id_invalid",
                "id_missing",
                "data_string",
                "id_number",
                "garbage",
                "huge:314572800",
                "metadata_list",
                "secret_number",
                "truncated",
                "drip",
            ],
            every=2.0,
        ),
    ),
    Scenario(
        "hostile-ack",
        "ack answers: unparseable 200, deep nesting, missing fields",
        cycle("ack", ["garbage", "truncated", "deep", "id_missing", "empty", "null"], every=1.5),
    ),
    Scenario(
        "hostile-stop",
        "stop answers: unparseable 200s and deep nesting",
        cycle("stop", ["garbage", "deep", "truncated", "null"], every=1.5),
    ),
    Scenario(
        "hostile-reads",
        "get, update, list and stats answers (the sandboxes' GetWork, UpdateWorkMetadata, ListWork, GetQueueStats)",
        cycle_operations(
            ["get", "update", "list", "stats"],
            ["garbage", "deep", "id_invalid", "truncated", "null", "metadata_list", "data_string"],
        ),
    ),
    Scenario("fuzzed-answers", "random mutations, statuses and drops on every endpoint (seeded)", fuzzed),
    Scenario("lease-theft", "admin steal and a rival client's heartbeat take active items", theft, hold=6.0),
    Scenario("sandbox-kill9", "kill -9 sandboxes mid-work; new ones start", kill9, hold=4.0),
    Scenario("keepalive-flood", "a client pings KeepAlive without reading", keepalive_flood, min_phase=15),
    Scenario("sigterm-mid-work", "SIGTERM the sidecar mid-work, a new one takes over", sigterm, hold=3.0),
    Scenario("sighup-mid-work", "SIGHUP the sidecar mid-work (must not kill it)", other_signal(signal.SIGHUP)),
    Scenario("claim-outage-35s", "claiming heartbeats fail for 35 s", claim_outage, full_only=True),
    Scenario(
        "lost-answers",
        "every operation in turn is applied, then its answer is lost: closed, never sent, sent too late, cut off",
        after_apply(LOST),
    ),
    Scenario(
        "stray-answers",
        "applied, then a second answer after the real one, a stray `200 {}` instead of it, garbage, "
        "Content-Length with chunked, two Content-Lengths, bytes after the body, a 1 MiB header block",
        after_apply(STRAY),
    ),
    Scenario(
        "lb-resets",
        "every operation in turn finds its kept-alive connection reset as it reuses it, before the request is sent "
        "on or after the Work API applied it; and a fifth of all reused connections reset",
        after_apply(
            RESETS,
            extra=[
                {"action": "reset", "forward_first": True, "probability": 0.1},
                {"action": "reset", "probability": 0.1},
            ],
        ),
    ),
    Scenario(
        "sidecar-crash-loop",
        "kill -9 the sidecar every 4 s; it restarts on the same --state-dir; sandboxes re-attach (TTL 8)",
        crash_loop,
        hold=6.0,
        ttl=8,
        state_dir=True,
        reattach=True,
        extra_flags=["--reattach-grace", "5"],
    ),
]


async def _act(scenario: Scenario, ctx: Context) -> None:
    """The fault phase: the scenario's action while an item a second keeps coming."""

    async def feed() -> None:
        while True:
            await asyncio.sleep(1.0)
            await ctx.enqueue(1)

    feeder = asyncio.ensure_future(feed())
    try:
        await scenario.action(ctx)
    except Exception as exc:  # noqa: BLE001 - any harness failure is reported in the table, never hidden or fatal
        ctx.errors.append(f"scenario action failed: {type(exc).__name__}: {exc}")
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


def injected(events: list[Event]) -> str | None:
    """What the fault proxy did in a scenario, per operation and action ("renew drop 3, claim late 1")."""
    counts: dict[tuple[str, str], int] = {}
    for e in events:
        if e.action != "pass":
            counts[(e.operation, e.action)] = counts.get((e.operation, e.action), 0) + 1
    if not counts:
        return None
    return "faults injected: " + ", ".join(f"{op} {action} {n}" for (op, action), n in sorted(counts.items()))


def _write_trace(path: Path, events: list[Event], log: list[dict[str, Any]]) -> None:
    """What the fault proxy saw and what the Work API logged, one JSON line each, beside the children's logs: the
    first thing to read when a scenario fails."""
    with path.open("w") as out:
        for e in events:
            out.write(json.dumps({"source": "proxy", **dataclasses.asdict(e)}) + "\n")
        for entry in log:
            out.write(json.dumps({"source": "api", **entry}, default=str) + "\n")


async def _judge(
    ctx: Context,
    emulator: Emulator,
    proxy: Proxy,
    procs: Processes,
    secrets_before: set[str],
    events_from: int,
    stalls_from: int,
) -> invariants.Verdict:
    """The invariants over everything the scenario left: the request log, the items, every process's output."""
    env = ctx.env
    log = [e for e in await emulator.requests() if e.get("environment_id") == env]
    items = await emulator.items(env)
    tokens: set[str] = set()
    for path in procs.directory.glob(f"tokens-{env}-*.txt"):
        tokens |= {line.strip() for line in path.read_text().splitlines() if line.strip()}
    outputs = [s.child.output() for s in ctx.sidecars] + [s.child.output() for s in ctx.sandboxes]
    verdict = invariants.check(
        item_ids=ctx.item_ids,
        items=items,
        log=log,
        sandboxes=[(s.sandbox_id, s.events(), s.child.killed_at) for s in ctx.sandboxes],
        outputs=outputs,
        secrets={KEY} | tokens | (proxy.secrets - secrets_before) | secrets_before,
        ttl_bounds=(MIN_TTL, MAX_TTL, DEFAULT_TTL),
        stolen=ctx.stolen,
        excluded=ctx.excluded,
        seen=invariants.Witness(proxy.intact_renewals(invariants.renewal_deadline(ctx.ttl)), proxy.invented_refusals()),
        ttl=ctx.ttl,
    )
    unknown = [
        f"{e.get('rpc', 'StopWork')} ended UNKNOWN"
        for s in ctx.sandboxes
        for e in s.events()
        if e["ev"] in ("rpc_error", "stop_error") and e.get("code") == "UNKNOWN"
    ]
    if unknown:
        ctx.errors.append(f"{len(unknown)} call(s) ended with status UNKNOWN (e.g. {unknown[0]})")
    tracebacks = sum(s.child.output().count("Traceback (most recent call last)") for s in ctx.sidecars)
    never_retrieved = sum(s.child.output().count("exception was never retrieved") for s in ctx.sidecars)
    if never_retrieved:
        ctx.errors.append(f"{never_retrieved} background task(s) died ('Task exception was never retrieved')")
    if tracebacks:
        verdict.notes.append(f"{tracebacks} traceback(s) in the sidecar's output")
    errors = [e for e in ctx.errors if e]
    verdict.errors = len(errors)
    _write_trace(procs.directory / f"trace-{env}.jsonl", proxy.events[events_from:], log)
    faults = injected(proxy.events[events_from:])
    stalls = proxy.stalls[stalls_from:]
    if stalls:
        ctx.notes.append(f"the fault proxy's event loop stalled {len(stalls)} time(s), at most {max(stalls):.1f}s")
    verdict.notes = errors + ctx.notes + verdict.notes + ([faults] if faults else [])
    return verdict


async def run_scenario(
    scenario: Scenario,
    emulator: Emulator,
    proxy: Proxy,
    procs: Processes,
    *,
    phase: float,
    seed: int,
    quick: bool,
    settle: float = 40.0,
) -> invariants.Verdict:
    env = f"env_chaos_{scenario.name.replace('-', '_')}_{seed}"
    ctx = Context(
        scenario.name,
        env,
        emulator,
        proxy,
        procs,
        max(phase, scenario.min_phase),
        seed,
        quick,
        extra_flags=list(scenario.extra_flags),
        rng=random.Random(seed),
        ttl=scenario.ttl,
        state_dir=scenario.state_dir,
        reattach=scenario.reattach,
    )
    proxy.clear()
    secrets_before = set(proxy.secrets)
    events_from, stalls_from = len(proxy.events), len(proxy.stalls)
    await ctx.start_sidecar()
    for index in range(scenario.sandboxes):
        ctx.start_sandbox(hold=scenario.hold, max_in_flight=2, keepalive=scenario.keepalive or index == 0)
    await ctx.enqueue(4)

    await _act(scenario, ctx)

    # settle: no faults; a healthy sandbox takes whatever comes back and stops it at once
    proxy.clear()
    if not ctx.sidecar.child.alive():
        ctx.errors.append(f"the sidecar died during the scenario (exit {ctx.sidecar.child.popen.poll()})")
        await ctx.start_sidecar()
    ctx.start_sandbox(hold=0.0, max_in_flight=8)

    async def settled() -> bool:
        views = {i["id"]: i for i in await emulator.items(env)}
        return all(views.get(w, {}).get("state") == "stopped" for w in ctx.item_ids if w not in ctx.excluded)

    await wait_for(settled, timeout=settle, interval=0.5)
    for sandbox in ctx.sandboxes:
        sandbox.child.kill()
    for sidecar in ctx.sidecars:
        if sidecar.child.alive():
            await sidecar.child.terminate(15)

    return await _judge(ctx, emulator, proxy, procs, secrets_before, events_from, stalls_from)
