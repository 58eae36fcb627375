"""`work-sidecar serve --print-config` and `work-sidecar scaler --print-config`, run as an operator would (the
installed script): every setting with where it came from, secrets redacted by value, exit 0, nothing started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import _flags
from sidecar.cli import SERVE_FLAGS
from sidecar.scaler import SCALER_FLAGS, _cli, scaler_config

BIN = Path(sys.executable).parent
API_KEY = "sk-print-config-4f1d9a"
AUTH_TOKEN = "tok-print-config-77c2e0"
URL_PASSWORD = "hunter2-print-config"


def _environment(**extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WORK_SIDECAR_")} | extra


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "work-sidecar"), *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


@pytest.fixture
def work_api() -> Iterator[socket.socket]:
    """A listening TCP socket standing for the Work API: a sidecar that started would connect to it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        yield server


def _nobody_connected(server: socket.socket) -> bool:
    try:
        connection, _ = server.accept()
    except BlockingIOError:
        return True
    connection.close()
    return False


def test_serve_prints_every_setting_its_source_and_starts_nothing(work_api: socket.socket, tmp_path: Path) -> None:
    port = work_api.getsockname()[1]
    sock = tmp_path / "sidecar.sock"
    env = _environment(WORK_SIDECAR_API_KEY=API_KEY, WORK_SIDECAR_TTL="45", WORK_SIDECAR_AUTH_TOKEN=AUTH_TOKEN)
    result = _run(
        "serve", "--print-config", "--api-url", f"http://ops:{URL_PASSWORD}@127.0.0.1:{port}/",
        "--environment-id", "env_print", "--listen", f"unix://{sock}", "--max-pollers", "3", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert set(rows) == {flag.name for flag in SERVE_FLAGS}, "one line per serve flag"
    assert rows["--environment-id"] == ["env_print", "flag"]
    assert rows["--max-pollers"] == ["3", "flag"]
    assert rows["--ttl"] == ["45", "env", "WORK_SIDECAR_TTL"]
    assert rows["--poll-block-ms"][1:] == ["default"]
    assert rows["--metrics-listen"] == ["(unset)", "default"]
    assert rows["--api-key"] == ["<redacted>", "env", "WORK_SIDECAR_API_KEY"]
    assert rows["--auth-token"] == ["<redacted>", "env", "WORK_SIDECAR_AUTH_TOKEN"]
    assert rows["--api-url"] == [f"http://ops:<redacted>@127.0.0.1:{port}/", "flag"]
    for secret in (API_KEY, AUTH_TOKEN, URL_PASSWORD):
        assert secret not in result.stdout + result.stderr
    assert not sock.exists(), "no socket bound"
    assert _nobody_connected(work_api), "the Work API was not called"


def test_serve_print_config_of_an_invalid_configuration_prints_it_then_fails_in_one_line() -> None:
    result = _run("serve", "--print-config", "--api-url", "http://127.0.0.1:9/", env=_environment())
    assert result.returncode == 2
    assert "--api-url" in result.stdout and "(unset)" in result.stdout
    assert result.stderr.strip().count("\n") == 0 and "--api-key" in result.stderr, result.stderr


def test_scaler_prints_every_setting_its_source_and_starts_nothing(work_api: socket.socket) -> None:
    port = work_api.getsockname()[1]
    env = _environment(WORK_SIDECAR_API_KEY=API_KEY, WORK_SIDECAR_STATS_INTERVAL="7.5")
    result = _run("scaler", "--print-config", "--api-url", f"http://127.0.0.1:{port}/", env=env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    assert set(rows) == {flag.name for flag in SCALER_FLAGS}
    assert rows["--stats-interval"] == ["7.5", "env", "WORK_SIDECAR_STATS_INTERVAL"]
    assert rows["--api-key"] == ["<redacted>", "env", "WORK_SIDECAR_API_KEY"]
    assert rows["--listen"] == ["127.0.0.1:6000", "default"], "the scaler's own port, not the sidecar's"
    assert API_KEY not in result.stdout + result.stderr
    assert _nobody_connected(work_api)


def test_the_scaler_listens_on_its_documented_port_by_default() -> None:
    """The scaler's `--listen` default is its own (127.0.0.1:6000, what deploy/keda names), not the sidecar's."""
    ns = _cli.build_parser().parse_args(["--api-url", "http://127.0.0.1:9/", "--api-key", "k"])
    config = scaler_config(_flags.values_of(_flags.resolve(ns, SCALER_FLAGS, {})))
    assert config.listen == ("127.0.0.1:6000",)


def test_a_secret_is_redacted_whatever_its_shape() -> None:
    [api_key] = [flag for flag in SERVE_FLAGS if flag.name == "--api-key"]
    [api_url] = [flag for flag in SERVE_FLAGS if flag.name == "--api-url"]
    for value in ("x", "a b c", "https://h/?k=v", "0600"):
        assert _flags.redacted(api_key, value) == "<redacted>"
    assert _flags.redacted(api_url, "https://user:p%40ss@h:1/p") == "https://user:<redacted>@h:1/p"
    assert _flags.redacted(api_url, "https://h/p") == "https://h/p"
