"""The wheel as a user gets it: built from this tree, installed into fresh virtualenvs, one per role.

- The wheel's only top-level package is `sidecar`; its base requirements are grpcio and protobuf, nothing else
  (build-time tools such as grpcio-tools stay out of every install set but the test extra's).
- `pip install work-sidecar` (the client only) fits in 25 MB, imports `sidecar.client` without the server stack,
  and does a round trip with a served sidecar; its `work-sidecar` command says in one line what to install.
- `pip install 'work-sidecar[server]'` runs `work-sidecar --version` and a demo `serve` (the embedded emulator).

Builds offline (`python -m build --no-isolation`); the virtualenvs install from the configured package index.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar._entry import INSTALL_HINT
from sidecar.emulator import AdminClient
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLIENT_BUDGET_BYTES = 25 * 1024 * 1024
SERVER_ONLY_MODULES = ("httpx", "opentelemetry", "starlette", "uvicorn", "aiohttp", "tenacity", "grpc_health")

pytestmark = pytest.mark.timeout(600)


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=480, **kwargs)  # type: ignore[call-overload, no-any-return]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = _run([str(BIN / "python"), "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)])
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    [found] = out.glob("work_sidecar-*.whl")
    return found


def _venv(path: Path, wheel: Path, extra: str = "") -> Path:
    """A fresh virtualenv (no pip of its own: this interpreter's pip installs into it) with the wheel."""
    made = _run([sys.executable, "-m", "venv", "--without-pip", str(path)])
    assert made.returncode == 0, made.stderr
    python = path / "bin" / "python"
    target = f"{wheel}[{extra}]" if extra else str(wheel)
    installed = _run(
        [str(BIN / "python"), "-m", "pip", "--python", str(python), "install", "--quiet", "--no-compile", target]
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-3000:]
    return python


def _site_packages(python: Path) -> Path:
    [found] = (python.parent.parent / "lib").glob("python3*/site-packages")
    return found


def _installed_bytes(python: Path) -> int:
    return sum(p.stat().st_size for p in _site_packages(python).rglob("*") if p.is_file())


def test_the_wheel_holds_sidecar_only_and_requires_grpc_and_protobuf(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"sidecar"}, f"top-level entries besides sidecar: {sorted(top)}"
    assert "sidecar/work/v1/work_service_pb2_grpc.py" in names and "sidecar/keda/externalscaler_pb2.py" in names
    requires = metadata.get_all("Requires-Dist") or []
    base = sorted(re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires if "extra ==" not in r)
    assert base == ["grpcio", "protobuf"], requires
    run_time = " ".join(r for r in requires if "extra ==" not in r or "'server'" in r or '"server"' in r).lower()
    assert "grpcio-tools" not in run_time and "mypy-protobuf" not in run_time, "build-time tools are not required"
    assert "grpcio-tools" in " ".join(requires), "make proto's tool comes with the test extra"
    assert "work-sidecar = sidecar._entry:main" in entry_points


@pytest.fixture(scope="module")
def client_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("client") / "venv", wheel)


@pytest.fixture(scope="module")
def server_python(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _venv(tmp_path_factory.mktemp("server") / "venv", wheel, "server")


def test_the_client_install_fits_its_budget(client_python: Path) -> None:
    installed = {p.name.split("-")[0].lower() for p in _site_packages(client_python).glob("*.dist-info")}
    assert installed == {"grpcio", "protobuf", "typing_extensions", "work_sidecar"}, installed  # grpcio's own
    size = _installed_bytes(client_python)
    print(f"client-only install: {size / 1024 / 1024:.1f} MB in site-packages")
    assert size <= CLIENT_BUDGET_BYTES, f"{size / 1024 / 1024:.1f} MB"


def test_the_client_install_says_in_one_line_how_to_get_the_sidecar(client_python: Path) -> None:
    script = client_python.parent / "work-sidecar"
    for argv in (["serve"], ["health", "--sidecar", "127.0.0.1:1"], ["--help"]):
        result = _run([str(script), *argv])
        assert result.returncode == 2, (argv, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and INSTALL_HINT in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_the_server_install_reports_its_version(server_python: Path) -> None:
    script = server_python.parent / "work-sidecar"
    usage = _run([str(script), "--help"])
    assert usage.returncode == 0 and "serve" in usage.stdout and "--version" in usage.stdout, usage.stderr
    result = _run([str(script), "--version"])
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout + result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def served(server_python: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A demo `work-sidecar serve` of the server install: (its gRPC address, its emulator's URL)."""
    grpc_port, emulator_port = _free_port(), _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("WORK_SIDECAR_", "OTEL_"))}
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(server_python.parent / "work-sidecar"), "serve", "--listen", f"127.0.0.1:{grpc_port}",
         "--emulator-port", str(emulator_port), "--log-format", "json"],
        env=env, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{emulator_port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


ROUND_TRIP = textwrap.dedent(
    """
    import asyncio, sys
    from sidecar.client import SidecarClient

    async def main() -> None:
        async with SidecarClient(sys.argv[1], sandbox_id="packaging-test") as sidecar:
            async for item in sidecar.assignments(max_in_flight=1):
                async with item:
                    print(item.work.id, flush=True)
                break
        loaded = sorted(name for name in SERVER_ONLY if name in sys.modules)
        print("server modules loaded:", loaded, flush=True)

    SERVER_ONLY = sys.argv[2].split(",")
    asyncio.run(asyncio.wait_for(main(), 60))
    """
)


async def test_a_client_only_install_does_a_round_trip_with_a_demo_sidecar(
    client_python: Path, served: tuple[str, str]
) -> None:
    address, emulator = served
    async with AdminClient(emulator) as admin:
        await eventually(lambda: _reachable(admin), timeout=30, message="the demo sidecar's emulator is up")
        [queued] = await admin.enqueue("env_local", 1)
        proc = await asyncio.create_subprocess_exec(
            str(client_python), "-c", ROUND_TRIP, address, ",".join(SERVER_ONLY_MODULES),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 90)
        assert proc.returncode == 0, err.decode()[-3000:]
        lines = out.decode().splitlines()
        assert lines == [queued["id"], "server modules loaded: []"], lines
        await eventually(lambda: _stopped(admin, queued["id"]), timeout=20, message="the item stopped")


async def _reachable(admin: AdminClient) -> bool:
    try:
        await admin.settings()
    except Exception:  # noqa: BLE001 - not listening yet
        return False
    return True


async def _stopped(admin: AdminClient, work_id: str) -> bool:
    item = await admin.get_item("env_local", work_id)
    return bool(item.get("state") == "stopped")
