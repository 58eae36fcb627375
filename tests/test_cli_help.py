"""The CLI teaches: every subcommand and every option has help text, `exec --help` shows how to give the command
and names WORK_SIDECAR_ADDR, and every usage error says how to fix it. Run as a user would (the installed
`work-sidecar` script), plus a walk over the argparse parsers so no option can be added without help."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar import cli
from sidecar import exec as exec_cli
from sidecar.emulator import _cli as emulator_cli
from sidecar.scaler import _cli as scaler_cli

BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if not k.startswith("WORK_SIDECAR_")} | {"COLUMNS": "200"}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "work-sidecar"), *args], capture_output=True, text=True, timeout=30, env=env or ENV, check=False
    )


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not isinstance(action, argparse._SubParsersAction) and not (action.help or "").strip()
    ]


def test_every_subcommand_has_help() -> None:
    parser = cli.build_parser()
    helps = {
        choice.dest: choice.help
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    }
    assert set(helps) == {"serve", "emulator", "health", "exec", "scaler"}
    assert all(text and text.strip() for text in helps.values()), helps
    top = _run("--help").stdout
    for name in helps:
        assert name in top


@pytest.mark.parametrize(
    "parser",
    [
        pytest.param(lambda: _subparsers(cli.build_parser())["serve"], id="serve"),
        pytest.param(lambda: _subparsers(cli.build_parser())["health"], id="health"),
        pytest.param(exec_cli.build_parser, id="exec"),
        pytest.param(emulator_cli.build_parser, id="emulator"),
        pytest.param(scaler_cli.build_parser, id="scaler"),
    ],
)
def test_every_option_has_help(parser: Callable[[], argparse.ArgumentParser]) -> None:
    built = parser()
    assert isinstance(built, argparse.ArgumentParser)
    if not built.prog.endswith(" serve"):  # serve's parser is the lead's (issue 15 left it out of scope)
        assert built.description, f"{built.prog} has a description"
    assert not _undocumented(built), f"{built.prog}: options without help: {_undocumented(built)}"


def test_exec_help_shows_the_command_and_the_variables() -> None:
    result = _run("exec", "--help")
    assert result.returncode == 0
    out = result.stdout
    usage = out.split("\n\n")[0]
    assert "-- COMMAND [ARGS" in usage, usage
    assert "WORK_SIDECAR_ADDR" in out and "WORK_SIDECAR_ADDRESS" in out, "the address variable and its alias"
    for name in ("WORK_SIDECAR_LEASE_TOKEN", "TRACEPARENT", "ANTHROPIC_SESSION_TOKEN", "WORK_SIDECAR_AUTH_TOKEN"):
        assert name in out, f"exec --help tells what the child gets: {name}"
    for option in ("--sidecar", "--max-in-flight", "--sandbox-id", "--auth-token", "--kill-grace", "--once"):
        assert option in out


def test_health_help_describes_it_and_its_timeout() -> None:
    result = _run("health", "--help")
    assert result.returncode == 0
    out = result.stdout
    assert "SERVING" in out and "Exit 0" in out, "health --help says what it checks and what its exit means"
    timeout_line = next(line for line in out.splitlines() if line.strip().startswith("--timeout"))
    assert "seconds" in timeout_line
    assert "WORK_SIDECAR_ADDR" in out


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["exec", "--", "true"], "set WORK_SIDECAR_ADDR"),
        (["exec", "--sidecar", "127.0.0.1:1"], "give the command after --"),
        (["exec", "--sidecar", "127.0.0.1:1", "./handle.sh"], "put the command after --"),
        (["exec", "--sidecar", "127.0.0.1:1", "--max-in-flight", "0", "--", "true"], "at least 1"),
        (["health"], "set WORK_SIDECAR_ADDR"),
        (["health", "--sidecar", "unix:relative.sock"], "unix:///absolute/path or host:port"),
    ],
)
def test_usage_errors_name_the_fix(args: list[str], fix: str) -> None:
    result = _run(*args)
    assert result.returncode == 2, result
    assert fix in result.stderr, result.stderr


def test_unreachable_sidecar_errors_name_the_fix(tmp_path: Path) -> None:
    gone = f"unix://{tmp_path}/nobody.sock"
    health = _run("health", "--sidecar", gone, "--timeout", "1")
    assert health.returncode == 1
    assert "is the sidecar running" in health.stderr and "work-sidecar serve" in health.stderr
    execd = _run("exec", "--sidecar", gone, "--reconnect-timeout", "1", "--once", "--", "true")
    assert execd.returncode == 1, execd
    assert "cannot reach the sidecar" in execd.stderr and "work-sidecar health --sidecar" in execd.stderr


def test_the_http_backend_flag_offers_every_backend_of_the_client() -> None:
    """cli.py spells the choices out (importing the client would slow every `health` probe); they must not drift."""
    from sidecar.workapi import DEPRECATED_BACKENDS, HTTP_BACKENDS

    [flag] = [flag for flag in cli.SERVE_FLAGS if flag.name == "--http-backend"]
    assert flag.choices == (*HTTP_BACKENDS, *DEPRECATED_BACKENDS)
