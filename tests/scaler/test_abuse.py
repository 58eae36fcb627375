"""The scaler under abuse and careless configuration, over real gRPC against the real emulator: a busy fleet
with nothing waiting, environments it cannot read, numbers that are not plain decimals, huge client strings,
`--help`, and the metadata keys of the docs."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar.keda import externalscaler_pb2 as pb
from sidecar.scaler import SCALER_FLAGS
from sidecar.workapi import WorkApiClient
from tests.core.conftest import ENV, KEY, Api
from tests.deploy._harness import BIN, base_environment
from tests.helpers import eventually

from .conftest import ScalerFactory


async def _take(api: Api, count: int) -> list[str]:
    """A worker outside the scaler polls, acks and heartbeats `count` items: they are in progress."""
    taken = []
    async with WorkApiClient(provider="anthropic", api_key=KEY, environment_id=ENV, base_url=api.url) as client:
        for _ in range(count):
            work = await client.poll(block_ms=500)
            assert work is not None
            await client.ack(work.id)
            await client.heartbeat(work.id, expected_last_heartbeat="NO_HEARTBEAT", desired_ttl_seconds=60)
            taken.append(work.id)
    return taken


async def test_a_busy_fleet_with_nothing_waiting_stays_active_with_include_in_progress(
    api: Api, start_scaler: ScalerFactory
) -> None:
    """Finding 9.
    A busy fleet with nothing waiting read as inactive with a metric of 0, which let a ScaledObject
    scale busy pods away. With `includeInProgress: "true"` the metric and IsActive count items in progress."""
    scaler = await start_scaler()
    await api.enqueue(3)
    await _take(api, 2)  # two in progress, one waiting
    include = {"includeInProgress": "true"}
    assert await eventually(lambda: _is(scaler.items(**include), 3), message="1 waiting + 2 in progress")
    assert await scaler.items() == 1, "without the key: the backlog alone"
    assert await scaler.items(includeInProgress="false") == 1

    await _take(api, 1)  # all three in progress, nothing waiting
    assert await eventually(lambda: _is(scaler.items(), 0), message="nothing waits")
    assert await scaler.items(**include) == 3
    assert await scaler.active(**include), "busy, so active"
    assert not await scaler.active(), "without the key only waiting items activate"
    assert not await scaler.active(activationThreshold="3", **include)

    stream = scaler.stub.StreamIsActive(scaler.ref(**include))
    try:
        first = await asyncio.wait_for(stream.read(), 5)
        assert isinstance(first, pb.IsActiveResponse) and first.result is True
    finally:
        stream.cancel()
    operations = {r["operation"] for r in await api.requests() if r.get("worker_id") == "scaler-under-test"}
    assert operations <= {"stats", "list"}, "the scaler only reads"


async def _is(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_environments_it_cannot_read_never_starve_one_it_can(
    strict_api: Api, start_scaler: ScalerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 9.
    150 calls naming made-up environments filled the scaler's reader slots, and a new environment
    then got RESOURCE_EXHAUSTED for 120 s. After 1,000 such calls a real environment answers within 2 s."""
    scaler = await start_scaler(
        api_url=strict_api.url, environment_id=None, stats_interval=5.0, max_age=10.0, max_backoff=10.0
    )
    await strict_api.enqueue(2)

    async def made_up(index: int) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await scaler.stub.IsActive(scaler.ref(environmentId=f"env_madeup{index:04d}"), timeout=30)
        return error.value.code()

    codes: set[grpc.StatusCode] = set()
    for batch in range(0, 1000, 50):
        codes |= set(await asyncio.gather(*(made_up(i) for i in range(batch, batch + 50))))
    started = time.monotonic()
    assert await scaler.items(environmentId=ENV) == 2
    assert time.monotonic() - started < 2.0
    assert codes == {grpc.StatusCode.NOT_FOUND}, codes
    assert len(scaler.scaler.readings) == 1, "only the readable environment holds a slot"
    with pytest.raises(grpc.aio.AioRpcError) as again:  # asked again at once: the remembered error, no request
        await scaler.stub.IsActive(scaler.ref(environmentId="env_madeup0999"), timeout=5)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    paths = [r["path"] for r in await strict_api.requests("stats")]
    assert sum("env_madeup0999" in path for path in paths) == 1
    warnings = [r for r in caplog.records if r.name == "sidecar.scaler" and r.levelno >= logging.WARNING]
    assert not warnings, "unknown environments named by a client are not the operator's warnings"


@pytest.mark.parametrize(
    "raw", ["1_000", "\uff11", "\u0661", "1e-300", "1e3", "inf", "nan", "0", "-1", "+1", "0x10", "1.", ".5", " ", "1 2"]
)
async def test_targets_are_plain_decimal_numbers_above_zero(start_scaler: ScalerFactory, raw: str) -> None:
    """Finding 9.
    The scaler took "1_000", a full-width digit and 1e-300 as a target."""
    scaler = await start_scaler()
    if raw.strip() == "":
        assert (await scaler.stub.GetMetricSpec(scaler.ref(targetItemsPerReplica=raw))).metricSpecs[0].targetSize == 1
        return
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await scaler.stub.GetMetricSpec(scaler.ref(targetItemsPerReplica=raw))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "targetItemsPerReplica must be a plain decimal" in (error.value.details() or "")


@pytest.mark.parametrize("raw", ["1_000", "\uff11", "1e-300", "inf", "nan", "-1", "+0", "0x0"])
async def test_activation_thresholds_are_plain_decimal_numbers(start_scaler: ScalerFactory, raw: str) -> None:
    """Finding 9 (the same numbers as an activationThreshold, which may be 0)."""
    scaler = await start_scaler()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await scaler.stub.IsActive(scaler.ref(activationThreshold=raw))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "activationThreshold must be a plain decimal" in (error.value.details() or "")
    assert not await scaler.active(activationThreshold="0"), "0 is a threshold"


@pytest.mark.parametrize("raw", ["1_000", "\uff11", "1e-300", "inf", "nan", "0", "-1"])
def test_target_flag_and_variable_take_plain_decimals_only(raw: str) -> None:
    """Finding 9 (the same numbers through --target-items and WORK_SIDECAR_TARGET_ITEMS)."""
    env = base_environment() | {"WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_API_URL": "http://127.0.0.1:9"}
    flag = subprocess.run(
        [str(BIN / "work-sidecar"), "scaler", f"--target-items={raw}"], capture_output=True, text=True, timeout=30,
        env=env,
    )  # fmt: skip
    assert flag.returncode == 2 and "--target-items" in flag.stderr, flag.stderr
    variable = subprocess.run(
        [str(BIN / "work-sidecar"), "scaler"], capture_output=True, text=True, timeout=30,
        env=env | {"WORK_SIDECAR_TARGET_ITEMS": raw},
    )  # fmt: skip
    assert variable.returncode == 2 and "WORK_SIDECAR_TARGET_ITEMS" in variable.stderr, variable.stderr
    assert "Traceback" not in flag.stderr + variable.stderr


@pytest.mark.parametrize(("raw", "value"), [("2", 2.0), ("2.5", 2.5), ("0.001", 0.001), ("007", 7.0)])
async def test_plain_decimals_are_taken(start_scaler: ScalerFactory, raw: str, value: float) -> None:
    scaler = await start_scaler()
    [spec] = (await scaler.stub.GetMetricSpec(scaler.ref(targetItemsPerReplica=raw))).metricSpecs
    assert spec.targetSizeFloat == value


def _everything_in(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    parts = [error.details() or "", repr(error.trailing_metadata()), repr(error.initial_metadata())]
    if status is not None:
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                parts.append(repr(dict(info.metadata)))
            parts.append(detail.value.decode("utf-8", "replace"))
    return "\n".join(parts)


async def test_client_strings_are_never_echoed(api: Api, start_scaler: ScalerFactory) -> None:
    """Finding 9.
    A 1 MB metricName was echoed back. No string a client sends comes back in any answer or error."""
    scaler = await start_scaler()
    await api.enqueue(1)
    big = "Zq" + "x" * (1 << 20)
    marker = "Zqxxxxxxxx"
    answer = await scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaler.ref(), metricName=""))
    assert answer.metricValues[0].metricName == "work-items"
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaler.ref(), metricName=big)),
        lambda: scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaler.ref(name=big), metricName=big)),
        lambda: scaler.stub.IsActive(scaler.ref(name=big, namespace=big, targetItemsPerReplica=big)),
        lambda: scaler.stub.IsActive(scaler.ref(activationThreshold=big)),
        lambda: scaler.stub.IsActive(scaler.ref(includeInProgress=big)),
        lambda: scaler.stub.IsActive(scaler.ref(environmentId=big)),
        lambda: scaler.stub.GetMetricSpec(scaler.ref(**{big: "1"})),
        lambda: scaler.stub.GetMetricSpec(scaler.ref(**{"targetItemsPerReplicaa" + big: "1"})),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call()
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        seen = _everything_in(error.value)
        assert marker not in seen and len(seen) < 2000, seen[:300]
    # A typo is still explained, in the scaler's own words.
    with pytest.raises(grpc.aio.AioRpcError) as typo:
        await scaler.stub.GetMetricSpec(scaler.ref(targetItemPerReplica="2"))
    assert "did you mean targetItemsPerReplica?" in (typo.value.details() or "")
    answers = await scaler.stub.GetMetricSpec(scaler.ref(name=big, namespace=big))
    assert marker not in repr(answers)


def test_help_shows_one_default_per_flag() -> None:
    """Finding 9.
    `scaler --help` showed two defaults for --listen."""
    text = subprocess.run(
        [str(BIN / "work-sidecar"), "scaler", "--help"], capture_output=True, text=True, timeout=30, check=True,
        env={**base_environment(), "COLUMNS": "400"},
    ).stdout  # fmt: skip
    blocks = re.split(r"\n  (?=--)", text.split("options:", 1)[1])
    for flag in SCALER_FLAGS:
        [block] = [b for b in blocks if b.startswith(flag.name + " ")]
        assert len(re.findall(r"\(default", block)) <= 1, block
    [listen] = [b for b in blocks if b.startswith("--listen ")]
    assert "(default 127.0.0.1:6000)" in listen and "50051" not in listen


async def test_items_in_progress_are_counted_across_pages_up_to_max_list_pages(api: Api) -> None:
    """The count pages through the list; a list longer than max_list_pages fails the read, saying what to raise."""
    from sidecar.scaler._readings import EnvironmentReader, TooManyItems

    await api.enqueue(5)
    await _take(api, 3)
    client = WorkApiClient(provider="anthropic", api_key=KEY, environment_id=ENV, base_url=api.url)
    options = {"interval": 0.2, "max_backoff": 1.0, "max_age": 5.0, "linger": 5.0, "page_size": 2}
    reader = EnvironmentReader(client, max_list_pages=3, **options)  # type: ignore[arg-type]
    try:
        reading = await reader.current(5, in_progress=True)
        assert (reading.waiting, reading.in_progress) == (2, 3), "5 items listed over 3 pages of 2"
    finally:
        await reader.close()
    short = EnvironmentReader(
        WorkApiClient(provider="anthropic", api_key=KEY, environment_id=ENV, base_url=api.url),
        max_list_pages=2,
        **options,  # type: ignore[arg-type]
    )
    try:
        with pytest.raises(TooManyItems, match="raise --max-list-pages"):
            await short.current(5, in_progress=True)
        assert (await short.current(5)).waiting == 2, "calls that do not count items in progress keep their reading"
    finally:
        await short.close()


async def test_first_reads_in_flight_give_way_to_a_new_environment(api: Api, start_scaler: ScalerFactory) -> None:
    """Every slot taken by first reads still in flight: a new environment takes the slot of the least recently
    asked-for one, whose caller hears UNAVAILABLE at once (not after its first-reading timeout)."""
    scaler = await start_scaler(max_environments=2, first_reading_timeout=10.0)
    for slow in ("env_slow_a", "env_slow_b"):
        await api.fault(operation="stats", environment_id=slow, latency_ms=5000, count=None)
    slow_a = asyncio.ensure_future(scaler.stub.IsActive(scaler.ref(environmentId="env_slow_a"), timeout=20))
    await eventually(lambda: len(scaler.scaler.readings) == 1)
    slow_b = asyncio.ensure_future(scaler.stub.IsActive(scaler.ref(environmentId="env_slow_b"), timeout=20))
    await eventually(lambda: len(scaler.scaler.readings) == 2)
    started = time.monotonic()
    await api.enqueue(1)
    assert await scaler.items() == 1, "the new environment got a slot"
    with pytest.raises(grpc.aio.AioRpcError) as evicted:
        await slow_a
    assert time.monotonic() - started < 4.0, "told at once, not after the slow read or the timeout"
    assert evicted.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "TOO_MANY_NEW_ENVIRONMENTS" in _everything_in(evicted.value)
    assert "set aside" in (evicted.value.details() or "")
    assert not (await slow_b).result, "the other slow one still gets its reading"
