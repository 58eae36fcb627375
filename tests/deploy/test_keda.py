"""deploy/keda/: every manifest validated offline (Kubernetes kinds against the Kubernetes schema, KEDA's
ScaledJob/ScaledObject against tests/deploy/schemas/, written from KEDA's documented spec), and the pods'
configurations run as real processes against the emulator: the one-item Job completes, the ScaledObject's
sandbox loop finishes its item on SIGTERM, the per-node sidecar's socket admits its group only."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import kubernetes_validate as kv
import pytest
import yaml

from sidecar.cli import SERVE_FLAGS
from sidecar.scaler import SCALER_FLAGS
from sidecar.scaler._metadata import parse as parse_metadata
from tests.core.conftest import ENV, KEY, Api
from tests.helpers import eventually, serving, stays

from ._harness import BIN, ROOT, AddressMap, base_environment, run_command, serve_process, until_command_succeeds

KEDA = ROOT / "deploy" / "keda"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
VERSIONS = ["1.29.0", kv.latest_version()]
VARIANTS = ("scaler", "scaledjob", "scaledobject", "daemonset")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _all_documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(KEDA.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or path.name.endswith("-patch.yaml"):
            continue
        found += [(str(path.relative_to(KEDA)), doc) for doc in _documents(path)]
    return found


def _schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((SCHEMAS / f"keda-{kind.lower()}.schema.json").read_text())
    return schema


def validate(document: dict[str, Any], version: str) -> None:
    """A Kubernetes kind against Kubernetes' schema; a KEDA kind against ours, and its embedded Kubernetes
    parts (a ScaledJob's JobSpec, a ScaledObject's HPA behavior) against Kubernetes' schema."""
    if document["apiVersion"] != "keda.sh/v1alpha1":
        kv.validate(document, version, strict=True)
        return
    jsonschema.validate(document, _schema(document["kind"]), cls=jsonschema.Draft202012Validator)
    spec = document["spec"]
    if document["kind"] == "ScaledJob":
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": spec["jobTargetRef"]}
        kv.validate(job, version, strict=True)
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "h"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "d"}, "maxReplicas": 1, "behavior": behavior},
        }  # fmt: skip
        kv.validate(hpa, version, strict=True)


def _render(variant: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(KEDA / variant)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def _of_kind(documents: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    [found] = [d for d in documents if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


def _pod_of(document: dict[str, Any]) -> dict[str, Any]:
    spec = document["spec"]
    template = spec["jobTargetRef"]["template"] if document["kind"] == "ScaledJob" else spec["template"]
    pod: dict[str, Any] = template["spec"]
    return pod


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    containers: list[dict[str, Any]] = [*pod.get("initContainers", []), *pod["containers"]]
    [found] = [c for c in containers if c["name"] == name]
    return found


def _env(container: dict[str, Any], resolved: dict[str, str] | None = None) -> dict[str, str]:
    """The container's env as the kubelet resolves it (the Secret's api-key, fieldRefs to a fake pod)."""
    out: dict[str, str] = {}
    for entry in container.get("env", []):
        if "value" in entry:
            out[entry["name"]] = str(entry["value"])
        elif "secretKeyRef" in entry["valueFrom"]:
            out[entry["name"]] = KEY
        else:
            out[entry["name"]] = {"metadata.name": "pod-x1", "spec.nodeName": "node-1"}[
                entry["valueFrom"]["fieldRef"]["fieldPath"]
            ]
    return out | (resolved or {})


def _help_env_names(command: str) -> set[str]:
    flags = SCALER_FLAGS if command == "scaler" else SERVE_FLAGS
    return {flag.env for flag in flags}


# -- schemas ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid(version: str) -> None:
    documents = _all_documents()
    kinds = {doc["kind"] for _, doc in documents}
    assert {"ScaledJob", "ScaledObject", "DaemonSet", "Deployment", "Service"} <= kinds
    for name, document in documents:
        try:
            validate(document, version)
        except (kv.ValidationError, jsonschema.ValidationError) as exc:
            raise AssertionError(f"{name}: {exc}") from None


@pytest.mark.parametrize("variant", VARIANTS)
def test_kustomizations_render_valid_manifests(variant: str) -> None:
    documents = _render(variant)
    assert documents
    for document in documents:
        validate(document, kv.latest_version())
        if variant != "scaler":
            assert document["metadata"].get("namespace") == "work-sidecar", document["metadata"]["name"]
    images = [c["image"] for d in documents if d["kind"] != "ConfigMap" for c in _containers(d)]
    assert any(image.startswith("work-sidecar:") for image in images), "the images: override applies"


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    if document["kind"] not in ("Deployment", "DaemonSet", "ScaledJob"):
        return []
    pod = _pod_of(document)
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize(
    ("kind", "path", "value"),
    [
        ("ScaledJob", ["spec", "triggers", 0, "metadata", "targetItemPerReplica"], "1"),  # a misspelt key
        ("ScaledJob", ["spec", "triggers", 0, "metadata", "targetItemsPerReplica"], 1),  # not a string
        ("ScaledJob", ["spec", "triggers", 0, "metadata", "targetItemsPerReplica"], "0"),  # not positive
        ("ScaledJob", ["spec", "triggers", 0, "type"], "externall"),
        ("ScaledJob", ["spec", "pollingIntervall"], 5),
        ("ScaledJob", ["spec", "scalingStrategy", "strategy"], "acurate"),
        ("ScaledJob", ["spec", "jobTargetRef", "template", "spec", "containers", 0, "imagee"], "x"),  # Kubernetes
        ("ScaledObject", ["spec", "scaleTargetRef", "nmae"], "x"),
        ("ScaledObject", ["spec", "triggers", 0, "metadata", "scalerAddress"], "no-port"),
        ("ScaledObject", ["spec", "fallback", "replica"], 2),
        ("ScaledObject", ["spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", "x"], 1),
    ],
)
def test_a_typo_fails_the_schema(kind: str, path: list[Any], value: Any) -> None:
    [document] = [copy.deepcopy(doc) for _, doc in _all_documents() if doc["kind"] == kind]
    validate(document, kv.latest_version())
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises((kv.ValidationError, jsonschema.ValidationError)):
        validate(document, kv.latest_version())


# -- the pieces fit together -----------------------------------------------------------------------------------


def test_triggers_reach_the_scaler_and_pass_its_metadata_check() -> None:
    scaler = _documents(KEDA / "scaler" / "deployment.yaml")[0]
    service = _documents(KEDA / "scaler" / "service.yaml")[0]
    container = _container(_pod_of(scaler), "scaler")
    [tcp] = [a for a in _env(container)["WORK_SIDECAR_LISTEN"].split(",") if not a.startswith("unix:")]
    listen_port = int(tcp.rpartition(":")[2])
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"] == listen_port
    [port] = service["spec"]["ports"]
    assert service["spec"]["selector"].items() <= scaler["spec"]["template"]["metadata"]["labels"].items()
    for variant in ("scaledjob", "scaledobject"):
        namespace = yaml.safe_load((KEDA / variant / "kustomization.yaml").read_text())["namespace"]
        for _, document in _all_documents():
            if document["kind"] not in ("ScaledJob", "ScaledObject"):
                continue
            for trigger in document["spec"]["triggers"]:
                assert trigger["metadata"]["scalerAddress"] == f"{service['metadata']['name']}.{namespace}.svc:6000"
                assert trigger["authenticationRef"]["name"] == "work-sidecar-scaler-tls", "mutual TLS to the scaler"
                assert port["port"] == 6000
                query = parse_metadata(trigger["metadata"], environment_id="env_x", target=1.0, activation=0.0)
                assert query.include_in_progress == (document["kind"] == "ScaledObject"), "the load; Jobs: backlog"
    assert _env(container)["WORK_SIDECAR_ENVIRONMENT_ID"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_env_names_are_real_flags(variant: str) -> None:
    for document in _render(variant):
        for container in _containers(document):
            names = {e["name"] for e in container.get("env", []) if e["name"].startswith("WORK_SIDECAR_")}
            if container.get("args") == ["scaler"]:
                assert names <= _help_env_names("scaler"), names - _help_env_names("scaler")
            elif container["image"].startswith("work-sidecar") and not container.get("command"):  # serve
                assert names <= _help_env_names("serve"), names - _help_env_names("serve")
            else:  # a sandbox: only what `work-sidecar exec` reads
                assert names <= {"WORK_SIDECAR_ADDR", "WORK_SIDECAR_AUTH_TOKEN"}, names
            assert not any("value" in e for e in container.get("env", []) if e["name"] == "WORK_SIDECAR_API_KEY")


def test_scaledjob_pod_takes_exactly_one_item_and_lets_the_job_complete() -> None:
    job = _of_kind(_render("scaledjob"), "ScaledJob")
    pod = _pod_of(job)
    assert pod["restartPolicy"] == "Never" and job["spec"]["jobTargetRef"]["backoffLimit"] == 0
    [sidecar] = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always", "a native sidecar does not keep the Job's pod running"
    [sandbox] = pod["containers"]
    assert sandbox["command"][:3] == ["work-sidecar", "exec", "--once"], "one item (max_items=1), then exit"
    assert "--idle-exit" in sandbox["command"][: sandbox["command"].index("--")], "no item: the Job ends"
    assert job["spec"]["scalingStrategy"]["strategy"] == "accurate", "running Jobs are not in the metric"


def test_scaledobject_deployment_is_scale_in_safe() -> None:
    documents = _render("scaledobject")
    deployment = _of_kind(documents, "Deployment", "sandbox-worker")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    pod = _pod_of(deployment)
    sandbox = _container(pod, "sandbox")
    assert sandbox["command"] == ["/bin/sh", "/opt/work-sidecar/sandbox-loop.sh"]
    config_map = _of_kind(documents, "ConfigMap")
    assert config_map["data"]["sandbox-loop.sh"] == (KEDA / "scaledobject" / "sandbox-loop.sh").read_text()
    drain = float(_env(_container(pod, "work-sidecar"))["WORK_SIDECAR_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= 3600 + drain, "the longest item + the drain"
    scaled = _of_kind(documents, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


# -- run as real processes -------------------------------------------------------------------------------------


async def _start_sidecar(container: dict[str, Any], api: Api, short_dir: str) -> tuple[Any, dict[str, str], str]:
    addresses = AddressMap(short_dir)
    env = base_environment() | _env(container)
    env |= {"WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_ENVIRONMENT_ID": ENV, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env["WORK_SIDECAR_LISTEN"] = addresses.listen(env["WORK_SIDECAR_LISTEN"])
    for name in ("WORK_SIDECAR_HEALTH_LISTEN", "WORK_SIDECAR_METRICS_LISTEN"):
        if name in env:
            env[name] = addresses.address(env[name])
    if "WORK_SIDECAR_STATE_DIR" in env:  # the state volume, in a place a test may write
        env["WORK_SIDECAR_STATE_DIR"] = f"{short_dir}/state"
    socket = env["WORK_SIDECAR_LISTEN"].split(",")[0]
    return addresses, env, socket


async def test_scaledjob_pod_runs_one_item_then_both_containers_exit(api: Api, short_dir: str) -> None:
    job = _of_kind(_render("scaledjob"), "ScaledJob")
    pod = _pod_of(job)
    _, env, socket = await _start_sidecar(pod["initContainers"][0], api, short_dir)
    async with serve_process(["work-sidecar", "serve"], env) as served:
        assert await eventually(lambda: serving(socket), timeout=30)
        first, second = await api.enqueue(2)
        sandbox = _container(pod, "sandbox")
        argv = [*sandbox["command"][: sandbox["command"].index("--") + 1], "true"]  # the handler: `true`
        sandbox_env = base_environment() | _env(sandbox) | {"WORK_SIDECAR_ADDR": socket, "PATH": env["PATH"]}
        code, output = await run_command(argv, sandbox_env, timeout=30)
        assert code == 0, output
        states = {await api.state(first["id"]), await api.state(second["id"])}
        assert states == {"stopped", "queued"}, "exactly one item taken, run and stopped"
        served.process.terminate()  # the kubelet, once the sandbox has exited: the Job's pod completes
        assert await asyncio.wait_for(served.process.wait(), 10) == 0


async def test_scaledobject_sandbox_finishes_its_item_on_sigterm(api: Api, short_dir: str) -> None:
    documents = _render("scaledobject")
    pod = _pod_of(_of_kind(documents, "Deployment", "sandbox-worker"))
    _, env, socket = await _start_sidecar(_container(pod, "work-sidecar"), api, short_dir)
    release = Path(short_dir) / "release"
    handler = Path(short_dir) / "handler.sh"
    handler.write_text(f"#!/bin/sh\nwhile [ ! -e {release} ]; do sleep 0.05; done\n")
    handler.chmod(0o755)
    loop = KEDA / "scaledobject" / "sandbox-loop.sh"
    sandbox_env = base_environment() | {
        "WORK_SIDECAR_ADDR": socket, "PATH": env["PATH"], "SANDBOX_STATE_DIR": f"{short_dir}/state",
    }  # fmt: skip
    async with serve_process(["work-sidecar", "serve"], env) as served:
        assert await eventually(lambda: serving(socket), timeout=30)
        sandbox = await asyncio.create_subprocess_exec("/bin/sh", str(loop), str(handler), env=sandbox_env)
        try:
            [item] = await api.enqueue(1)
            await eventually(lambda: _state_is(api, item["id"], "active"), timeout=15, message="the item runs")
            await eventually(lambda: (Path(short_dir) / "state" / "busy").exists(), timeout=5)
            sandbox.send_signal(15)  # scale-in: the kubelet's SIGTERM to the sandbox container
            [queued] = await api.enqueue(1)

            async def still_running() -> bool:
                return sandbox.returncode is None and await api.state(item["id"]) == "active"

            await stays(still_running, seconds=1.5)  # the item in hand is not interrupted
            release.touch()
            assert await asyncio.wait_for(sandbox.wait(), 15) == 0
            assert await api.state(item["id"]) == "stopped", "finished and stopped, not released"
            assert await api.state(queued["id"]) == "queued", "no new item once SIGTERM arrived"
        finally:
            if sandbox.returncode is None:
                sandbox.kill()
                await sandbox.wait()

        idle = await asyncio.create_subprocess_exec("/bin/sh", str(loop), str(handler), env=sandbox_env)
        # SIGTERM once it watches (it may take the queued item first: its handler now exits at once)
        await eventually(lambda: _watching(socket), timeout=15, message="the loop's exec watches")
        idle.send_signal(15)
        assert await asyncio.wait_for(idle.wait(), 15) == 0, "an idle sandbox exits at once"
        served.process.terminate()
        assert await asyncio.wait_for(served.process.wait(), 30) == 0


async def _state_is(api: Api, work_id: str, state: str) -> bool:
    return await api.state(work_id) == state


async def _watching(socket: str) -> bool:
    from sidecar.work.v1 import work_service_pb2 as work_pb
    from sidecar.work.v1 import work_service_pb2_grpc as work_grpc

    async with grpc.aio.insecure_channel(socket) as channel:
        stats = await work_grpc.WorkServiceStub(channel).GetQueueStats(work_pb.GetQueueStatsRequest(), timeout=5)
    return stats.sidecar.watchers >= 1


async def test_per_node_socket_admits_the_sandbox_group_only(api: Api, short_dir: str) -> None:
    documents = _render("daemonset")
    daemonset = _of_kind(documents, "DaemonSet")
    pod = _pod_of(daemonset)
    sidecar = _container(pod, "work-sidecar")
    sandboxes = _pod_of(_of_kind(documents, "Deployment", "sandbox-node-worker"))
    [volume] = [v for v in pod["volumes"] if v["name"] == _mount(sidecar, "/var/run/work-sidecar")]
    [theirs] = [v for v in sandboxes["volumes"] if "hostPath" in v]
    assert volume["hostPath"]["path"] == theirs["hostPath"]["path"]
    group = sidecar["securityContext"]["runAsGroup"]
    assert sandboxes["securityContext"]["runAsGroup"] == group, "the sandboxes have the socket's group"
    assert sandboxes["securityContext"]["runAsUser"] != sidecar["securityContext"]["runAsUser"]
    _, env, socket = await _start_sidecar(sidecar, api, short_dir)
    assert env["WORK_SIDECAR_SOCKET_MODE"] == "0660"
    async with serve_process(["work-sidecar", "serve"], env) as served:
        assert await eventually(lambda: serving(socket), timeout=30)
        path = socket.removeprefix("unix://")
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == 0o660, f"{mode:#o}: owner and group may connect, nobody else"
        if os.geteuid() == 0 and Path(SYSTEM_PYTHON).exists():  # the kernel's check, seen from other users
            os.chmod(short_dir, 0o711)  # noqa: S103 (a test dir: others may reach the socket, as on a node)
            owner_group = os.stat(path).st_gid
            assert await _connects(path, uid=54321, gid=owner_group), "another UID with the socket's group"
            assert not await _connects(path, uid=54321, gid=54321), "another UID without the group"
        served.process.terminate()
        assert await asyncio.wait_for(served.process.wait(), 30) == 0


SYSTEM_PYTHON = "/usr/bin/python3"


def _mount(container: dict[str, Any], path: str) -> str:
    """The name of the volume `container` mounts at `path`."""
    [name] = [m["name"] for m in container.get("volumeMounts", []) if m["mountPath"] == path]
    return str(name)


async def _connects(path: str, *, uid: int, gid: int) -> bool:
    """Whether a process running as uid:gid may connect() to the Unix socket (the peer-credential check)."""
    code = "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])"
    process = await asyncio.create_subprocess_exec(
        SYSTEM_PYTHON, "-c", code, path, user=uid, group=gid, extra_groups=[], stderr=asyncio.subprocess.DEVNULL
    )
    return await asyncio.wait_for(process.wait(), 30) == 0


async def test_scaler_container_serves_keda(api: Api, short_dir: str, tmp_path: Path) -> None:
    """The scaler's container as deployed: mutual TLS on its TCP port with the Secret's files (made here with
    openssl), probes on its Unix socket, and a KEDA client presenting the TriggerAuthentication's certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    [deployment] = _documents(KEDA / "scaler" / "deployment.yaml")
    [auth] = _documents(KEDA / "scaler" / "triggerauthentication.yaml")
    assert {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]} == {"caCert", "tlsClientCert", "tlsClientKey"}
    container = _container(_pod_of(deployment), "scaler")
    [mount] = [m for m in container["volumeMounts"] if m["name"] == "tls"]
    tls = _scaler_tls(tmp_path)
    addresses = AddressMap(short_dir)
    env = base_environment() | _env(container) | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    env |= {"WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_ENVIRONMENT_ID": ENV}
    for name in ("WORK_SIDECAR_TLS_CERT", "WORK_SIDECAR_TLS_KEY", "WORK_SIDECAR_TLS_CLIENT_CA"):
        assert env[name].startswith(mount["mountPath"] + "/")
        env[name] = str(tls / Path(env[name]).name)
    env["WORK_SIDECAR_LISTEN"] = addresses.listen(env["WORK_SIDECAR_LISTEN"])
    env["WORK_SIDECAR_METRICS_LISTEN"] = addresses.listen(env["WORK_SIDECAR_METRICS_LISTEN"])
    [tcp] = [a for a in env["WORK_SIDECAR_LISTEN"].split(",") if not a.startswith("unix:")]
    async with serve_process(["work-sidecar", *container["args"]], env) as served:
        probe = addresses.argv(container["readinessProbe"]["exec"]["command"])
        assert await until_command_succeeds(probe, env, command_timeout=5, deadline=30, interval=0.2, served=served)
        from sidecar.keda import externalscaler_pb2 as pb
        from sidecar.keda import externalscaler_pb2_grpc as pb_grpc

        job = _of_kind(_render("scaledjob"), "ScaledJob")
        metadata = job["spec"]["triggers"][0]["metadata"]
        keda = grpc.ssl_channel_credentials(
            root_certificates=(tls / "client-ca.crt").read_bytes(),
            private_key=(tls / "keda.key").read_bytes(),
            certificate_chain=(tls / "keda.crt").read_bytes(),
        )
        target = tcp.replace("0.0.0.0", "127.0.0.1")
        options = (("grpc.ssl_target_name_override", "work-sidecar-scaler.work-sidecar.svc"),)
        async with grpc.aio.secure_channel(target, keda, options=options) as channel:
            ref = pb.ScaledObjectRef(name="sandbox-job", namespace="work-sidecar", scalerMetadata=metadata)
            answer = await pb_grpc.ExternalScalerStub(channel).IsActive(ref, timeout=10)
            assert answer.result is False
        served.process.terminate()
        assert await asyncio.wait_for(served.process.wait(), 10) == 0


def _scaler_tls(directory: Path) -> Path:
    """The two Secrets' files: the scaler's tls.crt/tls.key (for its Service name) and ca.crt (the CA of KEDA's
    client certificate); KEDA's keda.crt/keda.key and client-ca.crt (the CA of the scaler's certificate)."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    def authority(name: str) -> None:
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
                "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.crt"),
                "-subj", f"/CN={name}")  # fmt: skip

    def issue(name: str, ca: str, extension: str) -> None:
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.csr"))  # fmt: skip
        openssl("x509", "-req", "-in", str(directory / f"{name}.csr"), "-CA", str(directory / f"{ca}.crt"),
                "-CAkey", str(directory / f"{ca}.key"), "-CAcreateserial", "-days", "1",
                "-out", str(directory / f"{name}.crt"), "-extfile", str(directory / f"{name}.ext"))  # fmt: skip

    authority("client-ca")  # signs the scaler's certificate: KEDA's caCert
    authority("ca")  # signs KEDA's client certificate: the scaler's --tls-client-ca (ca.crt)
    issue("tls", "client-ca", "subjectAltName=DNS:work-sidecar-scaler.work-sidecar.svc\nextendedKeyUsage=serverAuth")
    issue("keda", "ca", "extendedKeyUsage=clientAuth")
    return directory
