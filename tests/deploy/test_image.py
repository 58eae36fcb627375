"""The built image, run (`make image-test`; skipped unless WORK_SIDECAR_IMAGE names a built image):

(a) as `docker run IMAGE` runs it: demo mode, its HEALTHCHECK command says SERVING, the stop signal drains it and
    it exits 0; it carries its version label and no pip, setuptools or grpcio-tools;
(b) as each shipped manifest runs its sidecar container (rendered with `kubectl kustomize`): the image's
    environment with the container's merged over it, the container's user and read-only root filesystem, its
    capabilities dropped, the image's VOLUMEs NOT made writable (`--image-volume ignore`, as Kubernetes runs an
    image), and only the volumes the manifest mounts; the pod's other init containers run first. Each reports
    SERVING to its grpc probes on the pod's IP, and a restart of the container with the same volumes keeps a
    lease a sandbox holds.

The Work API is the image's own emulator in a container whose network namespace the sidecar joins, as the
containers of a pod share one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar import __version__
from sidecar.emulator.admin_client import AdminClient
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

from ._dockerfile import parse as parse_dockerfile
from ._harness import ROOT
from .test_component import OVERLAYS, sidecars
from .test_kubernetes import render

IMAGE = os.environ.get("WORK_SIDECAR_IMAGE", "")
pytestmark = pytest.mark.skipif(not IMAGE, reason="make image-test builds the image and runs these")
TOOL = shlex.split(os.environ.get("CONTAINER_TOOL", "podman"))
ULIMITS = shlex.split(os.environ.get("CONTAINER_ULIMITS", ""))
KEY = "sk-image-test-environment-key-0123456789"
ENV = "env_image_test"
EMULATOR_PORT = 8787
DOCKERFILE = parse_dockerfile(ROOT / "Dockerfile")
T = TypeVar("T")


def tool(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*TOOL, *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join([*TOOL, *args])}: {result.returncode}: {result.stderr[-2000:]}")
    return result


def podman() -> bool:
    return Path(TOOL[0]).name == "podman"


def wait_for(condition: Any, *, timeout: float, message: str, interval: float = 0.25) -> Any:
    """Call `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(interval)


@contextmanager
def container(name_prefix: str, *args: str) -> Iterator[str]:
    name = f"{name_prefix}-{uuid.uuid4().hex[:8]}"
    tool("run", "--detach", "--name", name, *ULIMITS, *args)
    try:
        yield name
    finally:
        tool("rm", "--force", name, check=False)


def exit_code(name: str) -> int:
    state = json.loads(tool("inspect", name).stdout)[0]["State"]
    return int(state["ExitCode"])


def running(name: str) -> bool:
    return bool(json.loads(tool("inspect", name).stdout)[0]["State"]["Running"])


def log_records(name: str) -> list[dict[str, Any]]:
    result = tool("logs", name, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def health(address: str, service: str = "", timeout: float = 3.0) -> str:
    with grpc.insecure_channel(address) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return f"error: {exc.code().name}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))


# -- (a) as `docker run` runs it --------------------------------------------------------------------------------


def test_docker_run_serves_the_demo_and_drains_on_the_stop_signal() -> None:
    healthcheck = DOCKERFILE.final.last("HEALTHCHECK")
    assert healthcheck is not None
    check = json.loads(healthcheck.value.partition("CMD")[2].strip())
    with container("ws-demo", IMAGE) as name:

        def healthy() -> bool:
            result = tool("exec", name, *check, check=False)
            return result.returncode == 0 and result.stdout.strip() == "SERVING"

        wait_for(healthy, timeout=30, message=f"the HEALTHCHECK never passed: {log_records(name)[-5:]}")
        started = [r for r in log_records(name) if r.get("msg") == "work-sidecar serving"]
        assert started and started[0]["version"] == __version__, "the start-up line names the version"
        assert any("emulator" in str(r.get("msg")) for r in log_records(name)), "demo mode: the embedded emulator"
        stopped = time.monotonic()
        tool("stop", "--time", "40", name)  # the image's STOPSIGNAL, then a kill after 40 s
        assert time.monotonic() - stopped < 30, "drained well before the kill"
        assert exit_code(name) == 0
        assert any(r.get("msg") == "drained" for r in log_records(name))


def test_the_image_names_its_version_and_holds_no_installer() -> None:
    inspected = json.loads(tool("image", "inspect", IMAGE).stdout)[0]
    labels = inspected.get("Labels") or inspected["Config"]["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    version = tool("run", "--rm", *ULIMITS, IMAGE, "--version")
    assert version.stdout.strip() == f"work-sidecar {__version__}"
    script = (
        "for py in /opt/work-sidecar/bin/python python3; do $py -c 'import importlib.util as u, sys; "
        'found = [m for m in ("pip", "setuptools", "grpc_tools", "wheel", "ensurepip._bundled") '
        'if u.find_spec(m.split(".")[0]) and (m != "ensurepip._bundled" or u.find_spec(m))]; print(found)\'; done; '
        "command -v pip pip3 wheel || true; find / -xdev \\( -name 'pip-*.whl' -o -name 'setuptools-*.whl' \\) -print"
    )
    found = tool("run", "--rm", *ULIMITS, "--user", "0", "--entrypoint", "/bin/sh", IMAGE, "-c", script)
    assert found.stdout.split() == ["[]", "[]"], found.stdout


# -- (b) as each shipped manifest runs its sidecar container ---------------------------------------------------------


@dataclass
class Shape:
    """One shipped manifest's sidecar container and the pod around it."""

    overlay: str
    where: str
    pod: dict[str, Any]
    container: dict[str, Any]
    directories: dict[str, Path] = field(default_factory=dict)


def shapes() -> list[Shape]:
    found = []
    for overlay in OVERLAYS:
        for where, pod, sidecar in sidecars(render(ROOT / "deploy" / overlay)):
            found.append(Shape(overlay, where, pod, sidecar))
    return found


SHAPES = shapes() if IMAGE else []


def resolve_env(container: dict[str, Any], pod_name: str) -> dict[str, str]:
    """The container's env as the kubelet resolves it (the Secret's key, fieldRefs of a pod on node-1)."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            env[entry["name"]] = KEY
        else:
            path = entry["valueFrom"]["fieldRef"]["fieldPath"]
            env[entry["name"]] = {"metadata.name": pod_name, "spec.nodeName": "node-1"}[path]
    return env


def security_args(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The container's securityContext (over the pod's) as runtime flags."""
    context = {**pod.get("securityContext", {}), **container.get("securityContext", {})}
    args = []
    if "runAsUser" in context:
        args += ["--user", f"{context['runAsUser']}:{context.get('runAsGroup', context['runAsUser'])}"]
    if "fsGroup" in pod.get("securityContext", {}):
        args += ["--group-add", str(pod["securityContext"]["fsGroup"])]
    if context.get("readOnlyRootFilesystem"):
        args += ["--read-only"] + (["--read-only-tmpfs=false"] if podman() else [])
    for capability in context.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability.lower()]
    for capability in context.get("capabilities", {}).get("add", []):
        args += ["--cap-add", capability.lower()]
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    return args


def volume_args(shape: Shape, container: dict[str, Any], scratch: Path) -> list[str]:
    """Only the volumes the manifest mounts: an emptyDir as the kubelet makes it (0777), a hostPath as the node's
    directory (DirectoryOrCreate: made root-owned, 0755). The same directories across a container restart."""
    volumes = {volume["name"]: volume for volume in shape.pod.get("volumes", [])}
    args = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if mount["name"] not in shape.directories:
            directory = scratch / mount["name"]
            directory.mkdir()
            if "emptyDir" in volume:
                directory.chmod(0o777)
            else:
                assert "hostPath" in volume, f"{shape.where}: {volume}"
                directory.chmod(0o755)
            shape.directories[mount["name"]] = directory
        suffix = ":ro" if mount.get("readOnly") else ""
        args += ["--volume", f"{shape.directories[mount['name']]}:{mount['mountPath']}{suffix}"]
    return args


def run_args(shape: Shape, container: dict[str, Any], scratch: Path, network: str) -> list[str]:
    args = ["--network", f"container:{network}", *security_args(shape.pod, container)]
    args += volume_args(shape, container, scratch)
    if podman():
        args += ["--image-volume", "ignore"]  # as Kubernetes: an image's VOLUME is not a volume of the pod
    if "command" in container:
        args += ["--entrypoint", container["command"][0]]
    return args


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ws-image-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def probe_address(ip: str, shape: Shape, kind: str) -> tuple[str, str]:
    probe = shape.container[kind]["grpc"]
    return f"{ip}:{probe['port']}", probe.get("service", "")


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s.overlay}:{s.where}" for s in SHAPES])
def test_each_manifest_sidecar_serves_and_keeps_a_lease_across_a_restart(shape: Shape, scratch: Path) -> None:
    if not podman():
        pytest.skip("needs podman: `--image-volume ignore` runs an image's VOLUME as Kubernetes does")
    args = ["emulator", "--host", "0.0.0.0", "--port", str(EMULATOR_PORT), "--key", KEY, "--log-format", "json"]
    with container("ws-emulator", IMAGE, *args) as emulator:
        ip = json.loads(tool("inspect", emulator).stdout)[0]["NetworkSettings"]["IPAddress"]
        assert ip, "the pod's IP"
        api = f"http://{ip}:{EMULATOR_PORT}"
        wait_for(lambda: _answers(api), timeout=30, message="the emulator did not start")
        for init in shape.pod.get("initContainers", []):  # the pod's other init containers run first, to the end
            if init.get("restartPolicy") == "Always" or init is shape.container:
                continue
            command = init.get("command", [])
            tool(
                "run",
                "--rm",
                *ULIMITS,
                *run_args(shape, init, scratch, emulator),
                IMAGE,
                *command[1:],
                *init.get("args", []),
            )

        env = resolve_env(shape.container, pod_name="pod-x1")
        env |= {"WORK_SIDECAR_API_URL": f"http://127.0.0.1:{EMULATOR_PORT}", "WORK_SIDECAR_ENVIRONMENT_ID": ENV}
        env_args = [part for name, value in env.items() for part in ("--env", f"{name}={value}")]
        sidecar_args = [*run_args(shape, shape.container, scratch, emulator), *env_args, IMAGE]

        with container("ws-sidecar", *sidecar_args) as sidecar:
            wait_probes(shape, ip, sidecar)
            socket = _socket(shape)
            item_id, token = _hold_a_lease(api, socket)
            tool("kill", "--signal", "KILL", sidecar)  # the container dies (a crash, an OOM kill) ...
        with container("ws-sidecar", *sidecar_args) as again:  # ... and is restarted with the pod's volumes
            wait_probes(shape, ip, again)
            with grpc.insecure_channel(socket) as channel:
                stub = pb_grpc.WorkServiceStub(channel)
                held = stub.GetWork(pb.GetWorkRequest(work_id=item_id, lease_token=token), timeout=10)
                assert held.work.state == pb.WORK_STATE_ACTIVE, "the restarted sidecar holds the lease again"
                stub.StopWork(pb.StopWorkRequest(work_id=item_id, lease_token=token, force=True), timeout=10)
            assert _item(api, item_id)["state"] == "stopped", "and the sandbox could finish its item"
            assert len([r for r in _requests(api) if r["operation"] == "ack"]) == 1, "never delivered twice"
            tool("stop", "--time", "40", again)
            assert exit_code(again) == 0


def wait_probes(shape: Shape, ip: str, name: str) -> None:
    startup = shape.container["startupProbe"]
    address, service = probe_address(ip, shape, "startupProbe")

    def started() -> bool:
        assert running(name), f"{shape.where}: the sidecar exited: {tool('logs', name, check=False).stderr[-2000:]}"
        return health(address, service, startup.get("timeoutSeconds", 1)) == "SERVING"

    wait_for(started, timeout=startup["periodSeconds"] * startup["failureThreshold"], message="startup probe")
    for kind in ("readinessProbe", "livenessProbe"):
        address, service = probe_address(ip, shape, kind)
        wait_for(
            lambda address=address, service=service: health(address, service) == "SERVING",
            timeout=15, message=f"{shape.where}: {kind}",
        )  # fmt: skip


def _socket(shape: Shape) -> str:
    env = DOCKERFILE.final.declared_env() | {e["name"]: e.get("value", "") for e in shape.container["env"]}
    [path] = [a.removeprefix("unix://") for a in env["WORK_SIDECAR_LISTEN"].split(",") if a.startswith("unix://")]
    [mount] = [m for m in shape.container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/")]
    return f"unix://{shape.directories[mount['name']]}/{path.removeprefix(mount['mountPath']).lstrip('/')}"


def _hold_a_lease(api: str, socket: str) -> tuple[str, str]:
    """A sandbox takes an item and holds its lease (its WatchWork stream stays open until the sidecar dies)."""
    with grpc.insecure_channel(socket) as channel:
        stream = pb_grpc.WorkServiceStub(channel).WatchWork(pb.WatchWorkRequest(max_in_flight=1, sandbox_id="image"))
        admin(api, lambda client: client.enqueue(ENV, 1))
        for event in stream:
            if event.WhichOneof("event") == "work_assigned":
                assigned = event.work_assigned
                stream.cancel()
                return assigned.work.id, assigned.lease_token
    raise AssertionError("no item assigned")


def _answers(api: str) -> bool:
    try:
        admin(api, lambda client: client.requests())
    except httpx.HTTPError:
        return False
    return True


def admin(api: str, call: Callable[[AdminClient], Awaitable[T]]) -> T:
    """One call of the emulator's admin API."""

    async def go() -> T:
        async with AdminClient(api) as client:
            return await call(client)

    return asyncio.run(go())


def _item(api: str, work_id: str) -> dict[str, Any]:
    return admin(api, lambda client: client.get_item(ENV, work_id))


def _requests(api: str) -> list[dict[str, Any]]:
    return admin(api, lambda client: client.requests())
