"""The Dockerfile: lint-clean, structurally sound (multi-stage, slim non-root final stage, exec-form
entrypoint), and its ENTRYPOINT + CMD with its ENV really serve, pass its HEALTHCHECK and drain on its
STOPSIGNAL. No Docker engine needed: the image's command runs here as a process, as the image would run it."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import time
import tomllib
import zipfile
from pathlib import Path

import grpc
import pytest

from sidecar.core import is_loopback, parse_listen
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Api, Watch

from ._dockerfile import Dockerfile, Instruction, Stage, parse
from ._harness import (
    BIN,
    ROOT,
    SERVE_ENV_NAMES,
    AddressMap,
    base_environment,
    run_as_kwargs,
    run_command,
    serve_default,
    serve_process,
    until_command_succeeds,
    words,
)

DOCKERFILE = ROOT / "Dockerfile"
BUILD_TOOLS = {
    "apt-get", "apt", "apk", "dnf", "yum", "pip", "pip3", "gcc", "g++", "cc", "clang", "make", "cmake",
    "build-essential", "python3-dev", "libc6-dev", "git", "curl", "wget",
}  # fmt: skip


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE)


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert match, f"unsupported duration {duration!r}"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[match.group(2)]


def _venv(dockerfile: Dockerfile) -> tuple[Stage, str]:
    """The builder stage and the directory the final stage copies from it."""
    [copy] = [c for c in dockerfile.final.all("COPY") if "from" in c.flags()[0]]
    options, rest = copy.flags()
    source, destination = rest.split()
    assert source == destination, "the venv keeps its path (its scripts' shebangs name it)"
    return dockerfile.stage(options["from"]), source


def _listen(env: dict[str, str]) -> list[str]:
    return [part.strip() for part in env.get("WORK_SIDECAR_LISTEN", "").split(",") if part.strip()]


def _healthcheck(stage: Stage) -> tuple[dict[str, str], list[str]]:
    instruction = stage.last("HEALTHCHECK")
    assert instruction is not None, "the final stage has a HEALTHCHECK"
    options, rest = instruction.flags()
    keyword, _, command = rest.partition(" ")
    assert keyword.upper() == "CMD"
    argv = Instruction("CMD", command.strip(), instruction.line).exec_form()
    assert argv is not None, "HEALTHCHECK CMD in exec form (no shell needed in the image)"
    return options, argv


# -- lint ------------------------------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    hadolint = BIN / "hadolint"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_fails_on_a_warning(tmp_path: Path) -> None:
    """The lint above can fail: a Dockerfile with a warning-level finding (DL3007, `latest`) is rejected."""
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python:latest\nCMD ["python"]\n')
    result = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "DL3007" in result.stdout


# -- structure -------------------------------------------------------------------------------------------


def test_multi_stage_with_a_pinned_slim_final_stage(dockerfile: Dockerfile) -> None:
    assert len(dockerfile.stages) >= 2, "a builder stage and a final stage"
    for stage in dockerfile.stages:
        tag = stage.base.split("@")[0].rpartition("/")[2].partition(":")[2]
        assert tag and tag != "latest" and "$" not in stage.base, f"{stage.base}: pin the base image by tag"
    final = dockerfile.final
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", final.base), final.base
    assert final.name is None or final.name != "builder"


def test_final_stage_has_only_the_venv_and_no_build_tools(dockerfile: Dockerfile) -> None:
    builder, venv = _venv(dockerfile)
    assert any(re.search(rf"-m venv {re.escape(venv)}\b", run.value) for run in builder.all("RUN")), (
        "the builder creates the venv the final stage copies"
    )
    final = dockerfile.final
    copies = final.all("COPY") + final.all("ADD")
    assert all("from" in c.flags()[0] for c in copies), "the final stage copies nothing from the build context"
    installed = words(run.value for run in final.all("RUN")) & BUILD_TOOLS
    assert not installed, f"the final stage runs build/package tools: {installed}"
    assert f"{venv}/bin" in final.declared_env()["PATH"].split(":"), "the venv's scripts are on PATH"


def test_final_stage_runs_as_a_numeric_non_root_user(dockerfile: Dockerfile) -> None:
    user = dockerfile.final.last("USER")
    assert user is not None, "the final stage sets USER"
    assert re.fullmatch(r"\d+(:\d+)?", user.value), "numeric UID[:GID], so Kubernetes can check runAsNonRoot"
    assert all(int(part) != 0 for part in user.value.split(":"))
    assert user.line > max(run.line for run in dockerfile.final.all("RUN")), "no RUN after USER runs as root"


def test_entrypoint_cmd_stopsignal_healthcheck(dockerfile: Dockerfile) -> None:
    final = dockerfile.final
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None and cmd is not None
    entry_argv, cmd_argv = entrypoint.exec_form(), cmd.exec_form()
    assert entry_argv is not None, "exec-form ENTRYPOINT: the sidecar is PID 1 and gets the stop signal itself"
    assert cmd_argv is not None, "exec-form CMD"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry_argv[0] in scripts, "the ENTRYPOINT is the package's console script"
    assert cmd_argv[:1] == ["serve"]
    stopsignal = final.last("STOPSIGNAL")
    assert stopsignal is not None and stopsignal.value == "SIGTERM", "the sidecar drains on SIGTERM"
    options, health = _healthcheck(final)
    assert health[: len(entry_argv) + 1] == [*entry_argv, "health"]
    address = health[health.index("--sidecar") + 1]
    assert address in _listen(final.declared_env()), "the health check asks an address the sidecar listens on"
    grpc_timeout = float(health[health.index("--timeout") + 1]) if "--timeout" in health else 3.0
    assert _seconds(options["timeout"]) > grpc_timeout, "Docker must not kill the check before its gRPC deadline"


def test_env_is_real_serve_configuration(dockerfile: Dockerfile) -> None:
    env = dockerfile.final.declared_env()
    names = {name for name in env if name.startswith("WORK_SIDECAR_")}
    assert names and names <= SERVE_ENV_NAMES, f"not `work-sidecar serve` variables: {names - SERVE_ENV_NAMES}"
    assert "WORK_SIDECAR_API_KEY" not in env and "WORK_SIDECAR_AUTH_TOKEN" not in env, "no secret in the image"
    listen = _listen(env)
    tcp_ports = {parse_listen(a)[1].rpartition(":")[2] for a in listen if parse_listen(a)[0] == "tcp"}
    exposed = {p.split("/")[0] for e in dockerfile.final.all("EXPOSE") for p in e.value.split()}
    assert exposed and exposed <= tcp_ports, "EXPOSE names the sidecar's gRPC port"
    assert all(a.startswith("unix:") or is_loopback(a) for a in listen), (
        "the default listens on loopback/Unix only (non-loopback TCP would need a token baked into the image)"
    )


# -- the build context -------------------------------------------------------------------------------------


def _dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = relative.split("/")
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = re.escape(body).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = regex.replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_build_context_builds_the_wheel(dockerfile: Dockerfile, tmp_path: Path) -> None:
    """The builder's COPY set, minus .dockerignore, is enough to build the wheel (e.g. README.md for metadata)."""
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]  # fmt: skip
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    context = [path for path in tracked if not _dockerignored(path, patterns)]
    assert not any(path.startswith(("tests/", ".ci/", "examples/")) for path in context), "the context is minimal"
    builder, _ = _venv(dockerfile)
    source = tmp_path / "src"
    for copy in builder.all("COPY"):
        _, rest = copy.flags()
        *sources, destination = rest.split()
        for item in sources:
            matched = [p for p in context if p == item.rstrip("/") or p.startswith(item.rstrip("/") + "/")]
            assert matched, f"COPY {item}: nothing in the build context (.dockerignore?)"
            assert destination in ("./", ".") or destination.rstrip("/") == item.rstrip("/"), copy
            for path in matched:  # `COPY f ./` and `COPY dir/ dir/` into WORKDIR: paths stay as in the repo
                (source / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / path, source / path)
    result = subprocess.run(
        [str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("work_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "sidecar/work/v1/work_service_pb2.py" in names and "sidecar/cli.py" in names
    assert "work-sidecar = sidecar._entry:main" in entry_points


# -- the image's command, run as the image would run it -------------------------------------------------------


async def test_entrypoint_serves_passes_healthcheck_and_drains_on_stopsignal(
    dockerfile: Dockerfile, api: Api, short_dir: str
) -> None:
    final = dockerfile.final
    _, venv = _venv(dockerfile)
    env = final.env(base_environment())
    env["PATH"] = env["PATH"].replace(f"{venv}/bin", str(BIN))  # the image's venv is this test's venv
    addresses = AddressMap(short_dir)
    env["WORK_SIDECAR_LISTEN"] = addresses.listen(env["WORK_SIDECAR_LISTEN"])
    volumes = " ".join(v.value for v in final.all("VOLUME"))
    assert env["WORK_SIDECAR_STATE_DIR"] in volumes, "the state dir is a declared volume"
    env["WORK_SIDECAR_STATE_DIR"] = f"{short_dir}/state"  # that volume, where a test may write
    env |= {"WORK_SIDECAR_API_URL": api.url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV}
    entrypoint, cmd, user = final.last("ENTRYPOINT"), final.last("CMD"), final.last("USER")
    assert entrypoint is not None and cmd is not None
    argv = [*(entrypoint.exec_form() or []), *(cmd.exec_form() or [])]
    executable = shutil.which(argv[0], path=env["PATH"])
    assert executable == str(BIN / argv[0]), "the ENTRYPOINT resolves to the venv's console script on PATH"
    run_as = run_as_kwargs(user.value if user else None, short_dir)
    options, check = _healthcheck(final)
    check = addresses.argv(check)
    drain_timeout = float(env.get("WORK_SIDECAR_DRAIN_TIMEOUT") or str(serve_default("WORK_SIDECAR_DRAIN_TIMEOUT")))
    stopsignal = final.last("STOPSIGNAL")
    assert stopsignal is not None

    async with serve_process(argv, env, run_as) as served:
        healthy_within = _seconds(options["start-period"]) + _seconds(options["interval"]) * int(options["retries"])
        output = await until_command_succeeds(
            check, env, command_timeout=_seconds(options["timeout"]), deadline=healthy_within, interval=0.2,
            served=served, run_as=run_as,
        )  # fmt: skip
        assert output == "SERVING"
        if run_as:
            status = Path(f"/proc/{served.process.pid}/status").read_text()
            assert re.search(rf"^Uid:\s+{run_as['user']}\s", status, re.M), "runs as the image's USER"
        for tcp in [a for a in env["WORK_SIDECAR_LISTEN"].split(",") if not a.startswith("unix:")]:
            code, answer = await run_command(
                [*check[: check.index("--sidecar") + 1], tcp], env, _seconds(options["timeout"]), run_as
            )
            assert (code, answer) == (0, "SERVING"), f"the loopback listener {tcp} answers health too"

        socket = next(a for a in env["WORK_SIDECAR_LISTEN"].split(",") if a.startswith("unix:"))
        async with grpc.aio.insecure_channel(socket) as channel:
            stub = pb_grpc.WorkServiceStub(channel)
            watch = Watch(stub.WatchWork(pb.WatchWorkRequest(max_in_flight=1))).start()
            await api.enqueue(1)
            item = await watch.assigned(timeout=20)
            sent = time.monotonic()
            served.process.send_signal(signal.Signals[stopsignal.value])
            await watch.next("draining", timeout=10)
            code, answer = await run_command(check, env, _seconds(options["timeout"]), run_as)
            assert code != 0 and "NOT_SERVING" in answer, "the HEALTHCHECK reports the drain as unhealthy"
            await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
            code = await asyncio.wait_for(served.process.wait(), drain_timeout)
            took = time.monotonic() - sent
        assert code == 0, served.stderr_lines[-10:]
        assert took < drain_timeout
        assert await api.state(item.work.id) == "stopped"
        assert (Path(env["WORK_SIDECAR_STATE_DIR"]) / "leases.journal").exists(), "the lease journal was kept"


def test_the_image_labels_carry_the_package_version(dockerfile: Dockerfile) -> None:
    """`work-sidecar --version`, the start-up log line and the image's label name the same version."""
    from sidecar import __version__

    labels = " ".join(label.value for label in dockerfile.final.all("LABEL"))
    assert f'org.opencontainers.image.version="{__version__}"' in labels
    version = subprocess.run([str(BIN / "work-sidecar"), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"work-sidecar {__version__}"
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"] == __version__


def test_the_builder_leaves_no_installer_in_the_venv(dockerfile: Dockerfile) -> None:
    """pip, setuptools and grpcio-tools are not in what the final stage copies (make image-test checks the image)."""
    builder, _ = _venv(dockerfile)
    uninstall = [run.value for run in builder.all("RUN") if "uninstall" in run.value]
    assert uninstall and all(name in uninstall[-1] for name in ("pip", "setuptools", "grpcio-tools"))
