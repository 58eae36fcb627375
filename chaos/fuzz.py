"""gRPC input fuzzing with Hypothesis for every RPC of `sidecar.work.v1.WorkService`, against a real sidecar process.

Each RPC gets random and malformed requests: huge strings (up to 3 MB), newlines and control characters, ids
that look like paths, huge numbers, maps with odd keys; a real `work_id` / `lease_token` of a lease the fuzzer
holds is mixed in so the authorised paths are reached too. `raw_bytes` sends undecodable protobuf and invalid
UTF-8 in string fields through a generic channel call. Only the documented status codes are accepted (docs/api.md
"Errors" and `sidecar/core/edge/_status.py`), never UNKNOWN; the sidecar must stay alive and its RSS bounded.

Synchronous gRPC (Hypothesis drives plain functions); the runner calls it in a thread.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import psutil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

from .harness import BIN, KEY

SERVICE = "/sidecar.work.v1.WorkService/"
RPCS = ("WatchWork", "KeepAlive", "StopWork", "GetWork", "ListWork", "UpdateWorkMetadata", "GetQueueStats")
C = grpc.StatusCode
DOCUMENTED = frozenset(
    {
        C.OK, C.INVALID_ARGUMENT, C.PERMISSION_DENIED, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED,
        C.RESOURCE_EXHAUSTED, C.UNAVAILABLE, C.UNAUTHENTICATED,
    }
)  # fmt: skip
STREAM_ENDS = frozenset({C.DEADLINE_EXCEEDED, C.CANCELLED})  # our own deadline on a stream that keeps waiting
RSS_BOUND = 150 * 2**20

# -- strategies ---------------------------------------------------------------------------------------

_odd = st.sampled_from(
    ["", " ", "work_x", "../../etc/passwd", "a/b?c=d#e", "\n{\"level\":\"error\",\"msg\":\"forged\"}", "\x00",
     "\u202e", "%00", "NO_HEARTBEAT", "🦄" * 10, "x" * 1025]
)  # fmt: skip
_huge = st.integers(min_value=1_000, max_value=3_000_000).map(lambda n: "w" * n)
_control = st.text(alphabet='ab\n\r\t\x00\x1b{}"\\', max_size=40)
TEXT = st.one_of(st.text(max_size=60), _odd, _control, _huge)
U32 = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
MAPS = st.dictionaries(st.one_of(st.text(max_size=20), _odd), st.one_of(st.text(max_size=20), _odd), max_size=4)


@dataclass
class Held:
    work_id: str = ""
    token: str = ""


def _ids(held: Held) -> st.SearchStrategy[str]:
    return st.one_of(TEXT, st.just(held.work_id))


def _tokens(held: Held) -> st.SearchStrategy[str]:
    return st.one_of(TEXT, st.just(held.token))


def strategies(held: Held) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "WatchWork": st.builds(pb.WatchWorkRequest, max_in_flight=U32, sandbox_id=TEXT, max_items=U32),
        "KeepAlive": st.lists(
            st.builds(pb.KeepAliveRequest, work_id=_ids(held), lease_token=_tokens(held)), min_size=1, max_size=5
        ),
        "StopWork": st.builds(pb.StopWorkRequest, work_id=_ids(held), lease_token=_tokens(held), force=st.booleans()),
        "GetWork": st.builds(pb.GetWorkRequest, work_id=_ids(held), lease_token=_tokens(held)),
        "ListWork": st.builds(pb.ListWorkRequest, page_size=U32, page_token=TEXT),
        "UpdateWorkMetadata": st.builds(
            pb.UpdateWorkMetadataRequest,
            work_id=_ids(held),
            lease_token=_tokens(held),
            set=MAPS,
            remove=st.lists(st.one_of(st.text(max_size=20), _odd), max_size=4),
        ),
        "GetQueueStats": st.just(pb.GetQueueStatsRequest()),
    }


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    tag = bytes([(number << 3) | 2])
    size, out = len(payload), b""
    while True:
        byte = size & 0x7F
        size >>= 7
        out += bytes([byte | (0x80 if size else 0)])
        if not size:
            return tag + out + payload


RAW = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda b: _field(1, b), st.binary(min_size=1, max_size=40).filter(lambda b: _bad(b))),
    st.builds(lambda b: _field(2, b), st.binary(min_size=1, max_size=40).filter(lambda b: _bad(b))),
    st.sampled_from([b"\xff", b"\x0a\xff", b"\x0a\x05ab", b"\x08", b"\x0a\x02\xff\xfe", b"\x12\x02\xc3\x28"]),
)


def _bad(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


# -- calling ------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str = ""


def call(channel: grpc.Channel, rpc: str, request: Any, *, raw: bool = False) -> Outcome:
    """One call; the status code it ended with (OK or the error's)."""
    serializer: Callable[[Any], bytes] | None = None if raw else (lambda m: m.SerializeToString())
    method = SERVICE + rpc
    try:
        if rpc == "WatchWork":
            stream: Any = channel.unary_stream(method, request_serializer=serializer)(request, timeout=0.4)
            for _ in stream:
                pass
        elif rpc == "KeepAlive":
            messages = request if isinstance(request, list) else [request]
            answers: Any = channel.stream_stream(method, request_serializer=serializer)(iter(messages), timeout=2.0)
            for _ in answers:
                pass
        else:
            channel.unary_unary(method, request_serializer=serializer)(request, timeout=15.0)
    except grpc.RpcError as exc:
        error: Any = exc
        return Outcome(error.code(), (error.details() or "")[:200])
    return Outcome(C.OK)


def acceptable(rpc: str, outcome: Outcome) -> bool:
    if outcome.code in DOCUMENTED:
        return True
    return rpc in ("WatchWork", "KeepAlive") and outcome.code in STREAM_ENDS


def describe(request: Any) -> str:
    text = repr(request) if isinstance(request, bytes | list) else str(request).replace("\n", " ")
    return text if len(text) < 160 else text[:150] + f"… ({len(text)} chars)"


@dataclass
class Report:
    rpc: str
    examples: int = 0
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"rpc": self.rpc, "examples": self.examples, "failures": self.failures}


def fuzz_rpc(
    target: str, rpc: str, held: Held, *, examples: int, raw: bool = False, alive: Callable[[], bool] = lambda: True
) -> Report:
    report = Report(rpc + (" (raw bytes)" if raw else ""))
    strategy = RAW if raw else strategies(held)[rpc]
    options = [("grpc.max_send_message_length", 16 * 2**20), ("grpc.max_receive_message_length", 16 * 2**20)]
    with grpc.insecure_channel(target, options=options) as channel:

        @settings(
            max_examples=examples, deadline=None, database=None, derandomize=True,
            suppress_health_check=list(HealthCheck),
        )  # fmt: skip
        @given(request=strategy)
        def one(request: Any) -> None:
            report.examples += 1
            outcome = call(channel, rpc, request, raw=raw)
            if not acceptable(rpc, outcome):
                report.failures.append(f"{outcome.code.name} for {describe(request)}: {outcome.details}")
            if not alive():
                report.failures.append(f"the sidecar died after {describe(request)}")
                raise RuntimeError("the sidecar died")

        with contextlib.suppress(RuntimeError):  # the sidecar died: reported above
            one()
    report.failures = sorted(set(report.failures))
    return report


# -- a target: the emulator and a sidecar of its own --------------------------------------------------


class FuzzTarget:
    """A `work-sidecar serve` process (on an emulator URL) and a lease it holds for the fuzzer."""

    def __init__(self, emulator_url: str, directory: str, env: str = "env_fuzz") -> None:
        self.emulator_url = emulator_url
        self.env = env
        self.target = f"unix://{directory}/fuzz-{os.getpid()}-{time.monotonic_ns()}.sock"
        self.log_path = f"{directory}/sidecar-fuzz.log"
        argv = [str(BIN / "work-sidecar"), "serve", "--api-url", emulator_url, "--environment-id", env]
        argv += ["--listen", self.target, "--ttl", "30", "--log-format", "json", "--log-level", "DEBUG"]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "WORK_SIDECAR_API_KEY": KEY},
            )  # fmt: skip
        self.process = psutil.Process(self.popen.pid)
        self.held = Held()
        self.started_rss = 0
        self._watch: Any = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        try:
            return int(self.process.memory_info().rss)
        except psutil.Error:
            return 0

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.WorkServiceStub(channel)
            while True:
                try:
                    stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=2)
                    self.started_rss = self.rss()
                    return
                except grpc.RpcError:
                    if not self.alive() or time.monotonic() > deadline:
                        raise RuntimeError("the fuzz sidecar did not start") from None
                    time.sleep(0.1)

    def take_lease(self) -> Held:
        """Watch with one slot, enqueue an item, keep the assignment (the stream stays open in a thread)."""
        ready = threading.Event()
        channel = grpc.insecure_channel(self.target)
        stub = pb_grpc.WorkServiceStub(channel)
        self._watch = stub.WatchWork(pb.WatchWorkRequest(max_in_flight=1, sandbox_id="fuzzer"))

        def read() -> None:
            try:
                for event in self._watch:
                    if event.WhichOneof("event") == "work_assigned" and not ready.is_set():
                        self.held.work_id = event.work_assigned.work.id
                        self.held.token = event.work_assigned.lease_token
                        ready.set()
            except grpc.RpcError:
                pass

        threading.Thread(target=read, daemon=True).start()
        httpx.post(f"{self.emulator_url}/_emulator/environments/{self.env}/work", json={"count": 1}).raise_for_status()
        if not ready.wait(60):
            raise RuntimeError("the fuzzer never got a lease")
        return self.held

    def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def run_all(emulator_url: str, directory: str, *, examples: int) -> dict[str, Any]:
    target = FuzzTarget(emulator_url, directory)
    try:
        target.wait_ready()
        held = target.take_lease()
        before = target.rss()
        reports = [fuzz_rpc(target.target, rpc, held, examples=examples, alive=target.alive) for rpc in RPCS]
        reports += [
            fuzz_rpc(target.target, rpc, held, examples=max(10, examples // 4), raw=True, alive=target.alive)
            for rpc in RPCS
        ]
        after = target.rss()
        result: dict[str, Any] = {
            "rpcs": [r.to_json() for r in reports],
            "rss_before_mb": before / 2**20,
            "rss_after_mb": after / 2**20,
        }
        if after - before > RSS_BOUND:
            reports[0].failures.append(f"RSS grew by {(after - before) / 2**20:.0f} MB")
        if not target.alive():
            result["rpcs"].append({"rpc": "(process)", "examples": 0, "failures": ["the sidecar died"]})
        return result
    finally:
        target.close()


async def fuzz_all(procs: Any, emulator: Any, *, examples: int) -> dict[str, Any]:
    import asyncio

    return await asyncio.to_thread(run_all, emulator.url, str(procs.directory), examples=examples)


if __name__ == "__main__":  # pragma: no cover - a manual entry point: python -m chaos.fuzz EMULATOR_URL
    import json

    print(json.dumps(run_all(sys.argv[1], "/tmp", examples=int(sys.argv[2]) if len(sys.argv) > 2 else 50), indent=2))
