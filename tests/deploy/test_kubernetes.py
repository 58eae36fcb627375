"""deploy/kubernetes: schema-valid offline (kubernetes-validate's bundled JSON schemas, strict), the
native-sidecar pattern and its rules hold on the rendered Deployment (`kubectl kustomize`: the sidecar container
comes from deploy/components/sidecar), every variable is a real `work-sidecar serve` flag, and the sidecar
container's env really serves, answers its grpc probes and drains as a real process."""

from __future__ import annotations

import asyncio
import copy
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes_validate import utils as kv

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Api, Watch
from tests.helpers import eventually, free_port

from ._dockerfile import parse as parse_dockerfile
from ._harness import (
    BIN,
    ROOT,
    AddressMap,
    base_environment,
    run_as_kwargs,
    run_command,
    serve_default,
    serve_process,
    until_command_succeeds,
)

MANIFESTS = ROOT / "deploy" / "kubernetes"
OLDEST_NATIVE_SIDECARS = "1.29.0"  # SidecarContainers on by default (beta) since 1.29, GA in 1.33
SIDECAR_IMAGE = "work-sidecar"


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY` (client only, no cluster): what `kubectl apply -k` would apply."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    [doc] = render(MANIFESTS)
    assert doc["kind"] == "Deployment"
    return doc


@pytest.fixture(scope="module")
def pod(deployment: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def sidecar(pod: dict[str, Any]) -> dict[str, Any]:
    [container] = [c for c in pod.get("initContainers", []) if c["image"].split(":")[0].endswith(SIDECAR_IMAGE)]
    return dict(container)


@pytest.fixture(scope="module")
def serve_help() -> set[str]:
    """The variable names `work-sidecar serve --help` documents (the public contract)."""
    result = subprocess.run(
        [str(BIN / "work-sidecar"), "serve", "--help"], capture_output=True, text=True, timeout=30, check=True,
        env={**base_environment(), "COLUMNS": "200"},
    )  # fmt: skip
    names = set(re.findall(r"\[env (WORK_SIDECAR_\w+)\]", result.stdout))
    assert len(names) > 10
    return names


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def _literal_env(container: dict[str, Any]) -> dict[str, str]:
    return {name: str(entry["value"]) for name, entry in _env(container).items() if "value" in entry}


def _drain_timeout(sidecar: dict[str, Any]) -> float:
    literal = _literal_env(sidecar).get("WORK_SIDECAR_DRAIN_TIMEOUT")
    return float(literal if literal is not None else str(serve_default("WORK_SIDECAR_DRAIN_TIMEOUT")))


def _listen(sidecar: dict[str, Any]) -> list[str]:
    return [a.strip() for a in _literal_env(sidecar)["WORK_SIDECAR_LISTEN"].split(",") if a.strip()]


def _mount_of(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    for mount in container.get("volumeMounts", []):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return dict(mount)
    return None


# -- schema ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [OLDEST_NATIVE_SIDECARS, kv.latest_version()])
@pytest.mark.parametrize("name", ["deployment.yaml", "secret.example.yaml"])
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, version: str) -> None:
    for document in _documents(MANIFESTS / name):
        kv.validate(document, version, strict=True)  # raises ValidationError


def test_the_schema_check_can_fail(deployment: dict[str, Any]) -> None:
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


@pytest.mark.parametrize("version", [OLDEST_NATIVE_SIDECARS, kv.latest_version()])
def test_kustomization_builds_offline(version: str) -> None:
    """`kubectl kustomize` (client only, no cluster) renders one schema-valid Deployment."""
    documents = render(MANIFESTS)
    assert [doc["kind"] for doc in documents] == ["Deployment"], "the Secret is created out of band, not applied"
    for document in documents:
        kv.validate(document, version, strict=True)


# -- the native sidecar pattern ------------------------------------------------------------------------------


def test_sidecar_is_a_native_sidecar(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    assert sidecar["restartPolicy"] == "Always", "an init container with restartPolicy: Always"
    assert pod["containers"], "beside at least one sandbox container"
    assert all(c["image"].split(":")[0] != sidecar["image"].split(":")[0] for c in pod["containers"])


def test_socket_is_shared_through_an_empty_dir(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    [socket] = [a for a in _listen(sidecar) if a.startswith("unix://")]
    path = socket.removeprefix("unix://")
    mount = _mount_of(sidecar, path)
    assert mount is not None, "the socket lives in a mounted volume"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume
    for container in pod["containers"]:
        address = _literal_env(container).get("WORK_SIDECAR_ADDR", "")
        assert address.startswith("unix://"), f"{container['name']}: told where the socket is"
        theirs = _mount_of(container, address.removeprefix("unix://"))
        assert theirs is not None and theirs["name"] == mount["name"], f"{container['name']}: mounts the socket"
        assert address.removeprefix("unix://").removeprefix(theirs["mountPath"]) == path.removeprefix(
            mount["mountPath"]
        ), "the same socket file seen from both containers"


def test_the_sidecar_keeps_its_state_in_its_own_empty_dir(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    env = {entry["name"]: entry.get("value") for entry in sidecar["env"]}
    path = env["WORK_SIDECAR_STATE_DIR"]
    mount = _mount_of(sidecar, path)
    assert mount is not None and mount["mountPath"] == path, "the state dir is a volume (the root fs is read-only)"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert "emptyDir" in volume, "survives a restart of the sidecar container, not a pod deletion"
    for container in pod["containers"]:
        assert all(m["name"] != mount["name"] for m in container.get("volumeMounts", [])), "the token key stays"


def test_sandbox_containers_run_as_the_socket_owner(pod: dict[str, Any]) -> None:
    """The sidecar creates its socket 0600: only the same UID can connect. That UID is the image's USER."""
    user = parse_dockerfile(ROOT / "Dockerfile").final.last("USER")
    assert user is not None
    uid, _, gid = user.value.partition(":")
    pod_context = pod.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = {**pod_context, **container.get("securityContext", {})}
        assert str(context.get("runAsUser")) == uid, container["name"]
        assert str(context.get("runAsGroup")) == (gid or uid), container["name"]


def test_probes_are_native_grpc_probes_on_the_health_listener(sidecar: dict[str, Any]) -> None:
    """kubelet's own grpc probes (no process started per probe) on the health-only listener, which listens on
    every interface (the kubelet connects to the pod IP) and is a named container port."""
    health = _literal_env(sidecar)["WORK_SIDECAR_HEALTH_LISTEN"]
    host, _, port = health.rpartition(":")
    assert host in ("0.0.0.0", "[::]"), "the kubelet probes the pod IP"
    assert {"name": "health", "containerPort": int(port)} in sidecar["ports"]
    services = {}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = sidecar.get(kind)
        assert probe, f"{kind} is set"
        assert set(probe) & {"exec", "httpGet", "tcpSocket"} == set(), f"{kind}: no process per probe"
        assert probe["grpc"]["port"] == int(port), f"{kind}: the health listener"
        services[kind] = probe["grpc"].get("service", "")
    assert services == {"startupProbe": "liveness", "readinessProbe": "", "livenessProbe": "liveness"}, (
        "start-up and liveness pass while the Work API is unreachable (a mesh proxy not up yet); readiness does not"
    )
    liveness = sidecar["livenessProbe"]
    assert liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3) > _drain_timeout(sidecar), (
        "NOT_SERVING during a whole drain must not get the sidecar killed (a second SIGTERM exits at once)"
    )


def test_grace_period_outlasts_the_drain(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    assert pod["terminationGracePeriodSeconds"] > _drain_timeout(sidecar)


def test_api_key_comes_from_the_secret(pod: dict[str, Any], sidecar: dict[str, Any]) -> None:
    key = _env(sidecar)["WORK_SIDECAR_API_KEY"]
    assert "value" not in key
    reference = key["valueFrom"]["secretKeyRef"]
    [secret] = _documents(MANIFESTS / "secret.example.yaml")
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == reference["name"]
    assert reference["key"] in secret.get("stringData", {}) | secret.get("data", {})
    for container in [*pod["initContainers"], *pod["containers"]]:
        literal = _literal_env(container)
        assert not {"WORK_SIDECAR_API_KEY", "WORK_SIDECAR_AUTH_TOKEN"} & set(literal), "no plain-text secret"
        for value in literal.values():
            assert not re.search(r"sk-ant-|sk-[A-Za-z0-9_-]{20,}", value), "no key-like literal"
    deployment_text = (MANIFESTS / "deployment.yaml").read_text()
    assert "sk-" not in deployment_text


def test_locked_down_containers(pod: dict[str, Any]) -> None:
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container.get("securityContext", {})
        assert context.get("allowPrivilegeEscalation") is False, container["name"]
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert context.get("capabilities", {}).get("drop") == ["ALL"], container["name"]
        resources = container.get("resources", {})
        assert resources.get("requests", {}).get("memory") and resources.get("limits", {}).get("memory")
        assert resources["requests"].get("cpu"), container["name"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


def test_env_names_are_real_flags(pod: dict[str, Any], sidecar: dict[str, Any], serve_help: set[str]) -> None:
    names = set(_env(sidecar))
    assert names <= serve_help, f"not `work-sidecar serve` variables: {names - serve_help}"
    # what `work-sidecar exec` reads from its environment, as its --help lists it
    exec_help = subprocess.run(
        [str(BIN / "work-sidecar"), "exec", "--help"], capture_output=True, text=True, check=True
    ).stdout
    reads = exec_help.split("environment:")[1].split("the child gets:")[0]
    for container in pod["containers"]:
        for name in (n for n in _env(container) if n.startswith("WORK_SIDECAR_")):
            assert f"{name} " in reads, f"{container['name']}: {name} is read by `work-sidecar exec`"


# -- the sidecar container's configuration, run -------------------------------------------------------------


def _resolve_env(container: dict[str, Any], secret: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet would resolve it (secretKeyRef from the Secret, fieldRef)."""
    resolved: dict[str, str] = {}
    for name, entry in _env(container).items():
        if "value" in entry:
            resolved[name] = str(entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            resolved[name] = secret[entry["valueFrom"]["secretKeyRef"]["key"]]
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", entry
            resolved[name] = pod_name
    return resolved


async def test_sidecar_container_serves_passes_probes_and_drains(
    pod: dict[str, Any], sidecar: dict[str, Any], api: Api, short_dir: str
) -> None:
    addresses = AddressMap(short_dir)
    pod_name = "sandbox-worker-7d9f8c6b5-x2k4q"
    env = base_environment() | _resolve_env(sidecar, {"api-key": KEY}, pod_name=pod_name)
    env |= {"WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_ENVIRONMENT_ID": ENV}  # the test's Work API
    env["WORK_SIDECAR_LISTEN"] = addresses.listen(env["WORK_SIDECAR_LISTEN"])
    env["WORK_SIDECAR_STATE_DIR"] = f"{short_dir}/state"  # the state volume, in a place a test may write
    env["PATH"] = f"{BIN}:{env['PATH']}"
    context = {**pod.get("securityContext", {}), **sidecar.get("securityContext", {})}
    run_as = run_as_kwargs(f"{context['runAsUser']}:{context['runAsGroup']}", short_dir)
    argv = [*(sidecar.get("command") or ["work-sidecar"]), *(sidecar.get("args") or ["serve"])]  # image defaults
    env["WORK_SIDECAR_HEALTH_LISTEN"] = addresses.address(env["WORK_SIDECAR_HEALTH_LISTEN"])
    env["WORK_SIDECAR_METRICS_LISTEN"] = addresses.address(env["WORK_SIDECAR_METRICS_LISTEN"])
    probed = "127.0.0.1:" + env["WORK_SIDECAR_HEALTH_LISTEN"].rpartition(":")[2]  # the kubelet's view: the pod IP
    startup = sidecar["startupProbe"]
    async with serve_process(argv, env, run_as) as served:
        await eventually(
            lambda: grpc_probe(probed, startup), timeout=startup["periodSeconds"] * startup["failureThreshold"],
            interval=0.2, message=f"the startup probe never passed: {served.stderr_lines[-5:]}",
        )  # fmt: skip
        for kind in ("readinessProbe", "livenessProbe"):
            assert await grpc_probe(probed, sidecar[kind]), kind

        socket = next(a for a in env["WORK_SIDECAR_LISTEN"].split(",") if a.startswith("unix://"))
        async with grpc.aio.insecure_channel(socket) as channel:  # a sandbox with a free slot: polling starts
            watch = Watch(pb_grpc.WorkServiceStub(channel).WatchWork(pb.WatchWorkRequest(max_in_flight=1))).start()

            async def polled_as_the_pod() -> bool:
                return pod_name in {r.get("worker_id") for r in await api.requests("poll")}

            polled: bool = await eventually(
                polled_as_the_pod, timeout=10, message="WORK_SIDECAR_WORKER_ID (fieldRef) is the worker"
            )
            assert polled
            watch.cancel()
        sent = time.monotonic()
        served.process.terminate()  # what the kubelet sends (the image's STOPSIGNAL)
        code = await asyncio.wait_for(served.process.wait(), _drain_timeout(sidecar))
        assert code == 0, served.stderr_lines[-10:]
        assert time.monotonic() - sent < pod["terminationGracePeriodSeconds"]


async def grpc_probe(address: str, probe: dict[str, Any]) -> bool:
    """A kubelet grpc probe: grpc.health.v1 Check of `probe.grpc.service` within `timeoutSeconds`, SERVING or not."""
    request = health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", ""))
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                request, timeout=float(probe.get("timeoutSeconds", 1))
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


async def test_health_stays_open_behind_an_auth_token(api: Api) -> None:
    """What native `grpc:` probes would need: listening on 0.0.0.0 requires --auth-token, and with one the
    health service still answers a caller without a token (the kubelet sends none) while WorkService refuses."""
    port = free_port()
    env = base_environment() | {
        "PATH": f"{BIN}:{base_environment()['PATH']}",
        "WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": f"0.0.0.0:{port}",
    }  # fmt: skip
    code, output = await run_command(["work-sidecar", "serve"], env, timeout=30)
    assert code != 0 and "--auth-token" in output, "no token: refuses to listen beyond loopback"
    env["WORK_SIDECAR_AUTH_TOKEN"] = "probe-test-token-0123456789"
    async with serve_process(["work-sidecar", "serve"], env) as served:
        health = ["work-sidecar", "health", "--sidecar", f"127.0.0.1:{port}"]
        assert await until_command_succeeds(health, env, command_timeout=5, deadline=20, interval=0.2, served=served)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.WorkServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.GetQueueStats(pb.GetQueueStatsRequest(), timeout=5)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            metadata = (("authorization", f"Bearer {env['WORK_SIDECAR_AUTH_TOKEN']}"),)
            await stub.GetQueueStats(pb.GetQueueStatsRequest(), metadata=metadata, timeout=5)
