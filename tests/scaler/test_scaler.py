"""`externalscaler.ExternalScaler` over real gRPC, against the real emulator: the metric, activation,
the metadata contract, one shared reading per environment, StreamIsActive pushes, Work API errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar.core import ERROR_DOMAIN
from sidecar.keda import externalscaler_pb2 as pb
from sidecar.workapi import WorkApiClient
from tests.core.conftest import ENV, KEY, Api
from tests.helpers import eventually

from .conftest import INTERVAL, RunningScaler, ScalerFactory


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)
    assert status is not None, "the status carries google.rpc details"
    [detail] = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info


async def _worker_takes_one(api: Api, *, ack: bool) -> str:
    """A worker outside the scaler polls (and maybe acks) one item: pending, or running."""
    async with WorkApiClient(provider="anthropic", api_key=KEY, environment_id=ENV, base_url=api.url) as client:
        work = await client.poll(block_ms=500)
        assert work is not None
        if ack:
            await client.ack(work.id)
        return work.id


async def test_metric_counts_waiting_and_pending_items_not_running_ones(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler()
    assert await scaler.items() == 0
    await api.enqueue(5)
    await eventually(lambda: _equals(scaler.items(), 5), message="5 queued items")
    await _worker_takes_one(api, ack=False)  # polled, not acked: pending, still needs a replica
    await eventually(lambda: _equals(scaler.items(), 5), message="4 queued + 1 pending")
    await _worker_takes_one(api, ack=True)  # acked: running, has its replica
    await eventually(lambda: _equals(scaler.items(), 4), message="3 queued + 1 pending (the acked one is out)")
    operations = {(r["operation"], r.get("worker_id")) for r in await api.requests()}
    assert {op for op, worker in operations if worker == "scaler-under-test"} == {"stats"}, "the scaler takes no items"


async def _equals(value: Awaitable[float], expected: float) -> bool:
    return await value == expected


async def test_metric_spec_and_activation_follow_the_metadata(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler(target_items=3.0)
    spec = await scaler.stub.GetMetricSpec(scaler.ref())
    assert [(s.metricName, s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [("work-items", 3, 3.0)]
    spec = await scaler.stub.GetMetricSpec(scaler.ref(targetItemsPerReplica="2.5"))
    assert [(s.targetSize, s.targetSizeFloat) for s in spec.metricSpecs] == [(3, 2.5)]

    assert not (await scaler.stub.IsActive(scaler.ref())).result, "nothing waits"
    await api.enqueue(2)
    await eventually(lambda: _active(scaler), message="active once work waits")
    assert not (await scaler.stub.IsActive(scaler.ref(activationThreshold="2"))).result, "2 items, threshold 2"
    assert (await scaler.stub.IsActive(scaler.ref(activationThreshold="1.5"))).result


async def _active(scaler: RunningScaler, **metadata: str) -> bool:
    return bool((await scaler.stub.IsActive(scaler.ref(**metadata))).result)


async def test_environment_comes_from_the_metadata_or_the_flags(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler()
    response = await api.http.post("/_emulator/environments/env_other/work", json={"count": 3})
    response.raise_for_status()
    assert await eventually(lambda: _equals(scaler.items(environmentId="env_other"), 3))
    assert await scaler.items() == 0, "the default environment is the flag's"

    no_default = await start_scaler(environment_id=None)
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await no_default.stub.IsActive(no_default.ref())
    assert missing.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _error_info(missing.value).metadata["key"] == "environmentId"
    assert await no_default.items(environmentId="env_other") == 3


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"targetItemsPerReplica": "0"}, "targetItemsPerReplica"),
        ({"targetItemsPerReplica": "-1"}, "targetItemsPerReplica"),
        ({"targetItemsPerReplica": "ten"}, "targetItemsPerReplica"),
        ({"targetItemsPerReplica": "nan"}, "targetItemsPerReplica"),
        ({"activationThreshold": "-0.5"}, "activationThreshold"),
        ({"activationThreshold": "inf"}, "activationThreshold"),
        ({"environmentId": "env/../../x"}, "environmentId"),
        ({"targetItemPerReplica": "2"}, ""),  # a typo is refused, not ignored
    ],
)
async def test_bad_metadata_is_invalid_argument_with_error_info(
    start_scaler: ScalerFactory, metadata: dict[str, str], key: str
) -> None:
    scaler = await start_scaler()
    calls: list[Awaitable[object]] = [
        scaler.stub.IsActive(scaler.ref(**metadata)),
        scaler.stub.GetMetricSpec(scaler.ref(**metadata)),
        scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=scaler.ref(**metadata), metricName="work-items")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await call
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        info = _error_info(error.value)
        assert (info.reason, info.domain) == ("INVALID_SCALER_METADATA", ERROR_DOMAIN)
        if key:
            assert key in (error.value.details() or "")
            assert dict(info.metadata) == {"key": key}
        else:  # an unknown key: named by the known key it resembles, never repeated
            assert dict(info.metadata) == {"did_you_mean": "targetItemsPerReplica"}
            assert "targetItemPerReplica" not in (error.value.details() or "")


async def test_kedas_own_keys_are_accepted(start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler()
    ref = scaler.ref(scalerAddress="work-sidecar-scaler.keda:6000", targetItemsPerReplica="1")
    assert not (await scaler.stub.IsActive(ref)).result


async def test_one_reading_is_shared_by_every_call_and_scaled_object(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler(stats_interval=0.5, max_age=5.0)
    await scaler.items()  # the reader runs from the first call on
    await api.http.delete("/_emulator/requests")
    started = time.monotonic()
    for _ in range(10):  # 10 rounds x 4 ScaledObjects x 3 calls, concurrently
        calls: list[Awaitable[object]] = []
        for name in ("a", "b", "c", "d"):
            ref = scaler.ref(name=name, targetItemsPerReplica="2")
            calls += [
                scaler.stub.IsActive(ref),
                scaler.stub.GetMetrics(pb.GetMetricsRequest(scaledObjectRef=ref, metricName="work-items")),
                scaler.stub.GetMetricSpec(ref),
            ]
        await asyncio.gather(*calls)
        await asyncio.sleep(0.1)  # pacing of the callers (KEDA's pollingInterval), not synchronisation
    elapsed = time.monotonic() - started
    reads = len(await api.requests("stats"))
    assert 1 <= reads <= elapsed / 0.5 + 2, f"{reads} stats requests in {elapsed:.2f} s for 120 calls"


async def _next_answer(
    stream: grpc.aio.UnaryStreamCall[pb.ScaledObjectRef, pb.IsActiveResponse],
) -> pb.IsActiveResponse:
    answer = await asyncio.wait_for(stream.read(), 5)
    assert isinstance(answer, pb.IsActiveResponse), f"the stream ended: {answer!r}"
    return answer


async def test_stream_is_active_pushes_changes_within_a_stats_interval(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler()
    stream = scaler.stub.StreamIsActive(scaler.ref(activationThreshold="0"))
    try:
        first = await _next_answer(stream)
        assert first.result is False, "the current state at once"
        await api.enqueue(1)
        sent = time.monotonic()
        pushed = await _next_answer(stream)
        assert pushed.result is True
        assert time.monotonic() - sent < INTERVAL + 1.0, "within one stats interval (plus the read's round trip)"
        await _worker_takes_one(api, ack=True)  # a worker starts it: nothing waits any more
        back = await _next_answer(stream)
        assert back.result is False, "inactive again once nothing waits"
    finally:
        stream.cancel()


async def test_stream_metric_spec_is_unimplemented(start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler()
    stream = scaler.stub.StreamMetricSpec(scaler.ref())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stream.read()
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_work_api_errors_are_mapped(api: Api, start_scaler: ScalerFactory) -> None:
    wrong_key = await start_scaler(api_key="sk-wrong-key-000000000000000000")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await wrong_key.stub.IsActive(wrong_key.ref())
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _error_info(error.value).reason == "WORK_API_UNAUTHENTICATED"
    assert "sk-wrong" not in (error.value.details() or "")


async def test_failing_reads_back_off_and_a_stale_reading_is_not_served(api: Api, start_scaler: ScalerFactory) -> None:
    scaler = await start_scaler(max_age=1.0, max_backoff=0.8)
    await api.enqueue(2)
    assert await eventually(lambda: _equals(scaler.items(), 2))
    await api.fault(operation="stats", status=503, count=None)
    failed = await eventually(lambda: _fails(scaler), timeout=10, message="stale after max_age")
    assert failed == grpc.StatusCode.UNAVAILABLE
    reads = len(await api.requests("stats"))
    await asyncio.sleep(2.0)  # an observation window for the backoff, not synchronisation
    assert len(await api.requests("stats")) - reads <= 5, "failed reads back off (10 reads at the plain interval)"
    await api.clear_faults()
    assert await eventually(lambda: _fails(scaler, expect=2), timeout=10, message="recovers")


async def _fails(scaler: RunningScaler, expect: float | None = None) -> grpc.StatusCode | bool | None:
    """The call's error code; or, given `expect`, whether it answered that."""
    try:
        items = await scaler.items()
    except grpc.aio.AioRpcError as exc:
        return exc.code() if expect is None else False
    return None if expect is None else items == expect
