"""Work API errors reach the sandbox as proper gRPC codes with ErrorInfo (and RetryInfo on 429);
authorization, listening and health work as documented."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

from .conftest import Api, SidecarFactory
from .test_lifecycle import error_info


@pytest.mark.parametrize(
    ("status", "code", "reason"),
    [
        (404, grpc.StatusCode.NOT_FOUND, "WORK_NOT_FOUND"),
        (400, grpc.StatusCode.INVALID_ARGUMENT, "WORK_API_BAD_REQUEST"),
        (401, grpc.StatusCode.FAILED_PRECONDITION, "WORK_API_UNAUTHENTICATED"),
        (403, grpc.StatusCode.PERMISSION_DENIED, "WORK_API_PERMISSION_DENIED"),
        (503, grpc.StatusCode.UNAVAILABLE, "WORK_API_UNAVAILABLE"),
    ],
)
async def test_work_api_errors_map_to_grpc_codes(
    api: Api, start_sidecar: SidecarFactory, status: int, code: grpc.StatusCode, reason: str
) -> None:
    running = await start_sidecar()
    await api.fault(operation="stats", status=status, count=100)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=60)
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason and info.domain == "work-sidecar"
    assert info.metadata["http_status"] == str(status)
    assert info.metadata["request_id"], "the Work API's request id is in the details"
    await api.clear_faults()


async def test_rate_limit_is_resource_exhausted_with_retry_info(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    await api.fault(operation="stats", status=429, count=100, retry_after="0")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(caught.value)
    assert status is not None
    retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
    assert retry, "RetryInfo is attached"
    await api.clear_faults()


async def test_bearer_token_guards_every_call_but_health(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(auth_token="s3cret-token-value", use_tcp=True)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.GetQueueStats(pb.GetQueueStatsRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stub.GetQueueStats(pb.GetQueueStatsRequest(), metadata=(("authorization", "Bearer nope"),))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await running.stub.GetQueueStats(
        pb.GetQueueStatsRequest(), metadata=(("authorization", "Bearer s3cret-token-value"),)
    )
    assert ok.sidecar.environment_id == api.environment_id
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in running.stub.WatchWork(pb.WatchWorkRequest()):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(running.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="sidecar.work.v1.WorkService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_unix_socket_is_private_and_tcp_works(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    unix = running.sidecar.addresses[0]
    mode = stat.S_IMODE(os.stat(unix.removeprefix("unix://")).st_mode)
    assert mode == 0o600
    shared = await start_sidecar(socket_mode=0o660)  # for a sandbox that shares only the group (fsGroup)
    assert stat.S_IMODE(os.stat(shared.sidecar.addresses[0].removeprefix("unix://")).st_mode) == 0o660
    tcp = running.sidecar.addresses[1]
    assert tcp.startswith("127.0.0.1:") and not tcp.endswith(":0")
    async with grpc.aio.insecure_channel(tcp) as channel:
        stats = await pb_grpc.WorkServiceStub(channel).GetQueueStats(pb.GetQueueStatsRequest())
    assert stats.sidecar.provider == "anthropic"


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o700])
def test_socket_mode_is_owner_or_group_only(mode: int) -> None:
    from sidecar.core import ServerSettings

    with pytest.raises(ValueError, match="use 0600 or 0660"):
        ServerSettings(socket_mode=mode)


def test_non_loopback_tcp_needs_a_token() -> None:
    from sidecar.core import ServerSettings

    with pytest.raises(ValueError, match="auth-token"):
        ServerSettings(listen=("0.0.0.0:50051",))
    ServerSettings(listen=("0.0.0.0:50051",), auth_token="t" * 16)
    with pytest.raises(ValueError, match="at least 16 characters"):  # #11.10: a 1-character token was accepted
        ServerSettings(listen=("0.0.0.0:50051",), auth_token="t")
    with pytest.raises(ValueError, match="unix"):
        ServerSettings(listen=("unix:relative.sock",))


def test_config_repr_hides_secrets() -> None:
    from sidecar.core import SidecarSettings

    config = SidecarSettings.of(
        environment_id="env_x", api_key="sk-very-secret", auth_token="tok-very-secret-0123456789"
    )
    assert "sk-very-secret" not in repr(config) and "tok-very-secret-0123456789" not in repr(config)
