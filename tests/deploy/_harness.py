"""Run `work-sidecar serve` the way a container would (its argv, its environment) against a test emulator,
and run probe/health-check commands beside it, all as real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.cli import SERVE_FLAGS
from sidecar.core import parse_listen
from tests.helpers import eventually, free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SERVE_ENV_NAMES = frozenset(flag.env for flag in SERVE_FLAGS)


def serve_default(env_name: str) -> object:
    """The default `work-sidecar serve` uses when neither the flag nor `env_name` is set."""
    [flag] = [flag for flag in SERVE_FLAGS if flag.env == env_name]
    return flag.default


@dataclass
class AddressMap:
    """Rewrites the listen addresses of a deployment to ones a test may bind: Unix sockets into a temp dir,
    TCP ports to free ones (hosts stay as they are)."""

    directory: str
    mapping: dict[str, str] = field(default_factory=dict)

    def listen(self, value: str) -> str:
        return ",".join(self.address(part.strip()) for part in value.split(",") if part.strip())

    def address(self, address: str) -> str:
        if address not in self.mapping:
            kind, target = parse_listen(address)
            if kind == "unix":
                self.mapping[address] = f"unix://{self.directory}/{Path(target).name}"
            else:
                self.mapping[address] = f"{target.rpartition(':')[0]}:{free_port()}"
        return self.mapping[address]

    def argv(self, argv: Sequence[str]) -> list[str]:
        """The same command with every address it names rewritten."""
        out = []
        for arg in argv:
            for old, new in self.mapping.items():
                arg = arg.replace(old, new)
            out.append(arg)
        return out


def base_environment() -> dict[str, str]:
    """The test's environment without any WORK_SIDECAR_* or OTEL_* variable of its own."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("WORK_SIDECAR_", "OTEL_"))}


def expand(value: str, env: Mapping[str, str]) -> str:
    """$VAR and ${VAR} as Docker expands them in ENV (unset: empty)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), value)


RunAs = Mapping[str, Any]


def run_as_kwargs(user: str | None, directory: str) -> RunAs:
    """subprocess kwargs to run as the image's numeric `UID[:GID]` when the tests run as root (and hand it
    `directory`, as the image does with its socket directory); nothing otherwise."""
    if user is None or os.geteuid() != 0:
        return {}
    uid, _, gid = user.partition(":")
    kwargs: dict[str, Any] = {"user": int(uid), "group": int(gid or uid), "extra_groups": []}
    try:  # the interpreter may live where that user cannot go (e.g. a pyenv under /root): then run as we are
        subprocess.run([sys.executable, "-c", "import sidecar.cli"], check=True, timeout=30, **kwargs)
    except (PermissionError, subprocess.CalledProcessError):
        return {}
    os.chown(directory, kwargs["user"], kwargs["group"])
    return kwargs


@dataclass
class Served:
    process: asyncio.subprocess.Process
    env: dict[str, str]
    stderr_lines: list[str]


@contextlib.asynccontextmanager
async def serve_process(
    argv: Sequence[str], env: Mapping[str, str], run_as: RunAs | None = None
) -> AsyncIterator[Served]:
    """Start `argv` (resolved on env's PATH, as a container runtime does); kill it on exit if still alive."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        **dict(run_as or {}),
    )  # fmt: skip
    lines: list[str] = []

    async def drain_stderr() -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            lines.append(line.decode(errors="replace").rstrip())

    reader = asyncio.ensure_future(drain_stderr())
    try:
        yield Served(process, dict(env), lines)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.wait_for(reader, 10)


async def run_command(
    argv: Sequence[str], env: Mapping[str, str], timeout: float, run_as: RunAs | None = None
) -> tuple[int, str]:
    """Run a probe/health-check command to completion (killed after `timeout`, as Docker and kubelet do)."""
    process = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        **dict(run_as or {}),
    )  # fmt: skip
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, "timed out"
    return int(process.returncode or 0), output.decode(errors="replace").strip()


async def until_command_succeeds(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    command_timeout: float,
    deadline: float,
    interval: float,
    served: Served,
    run_as: RunAs | None = None,
) -> str:
    """Run the check every `interval` s until it exits 0; fail after `deadline` s or if the server died."""
    last: tuple[int, str] = (-1, "never ran")

    async def succeeded() -> bool:
        nonlocal last
        if served.process.returncode is not None:
            raise AssertionError(f"the sidecar exited ({served.process.returncode}): {served.stderr_lines[-5:]}")
        last = await run_command(argv, env, command_timeout, run_as)
        return last[0] == 0

    try:
        await eventually(succeeded, timeout=deadline, interval=interval, message=f"{list(argv)} did not succeed")
    except AssertionError as failure:
        raise AssertionError(f"{failure}; last: {last}; {served.stderr_lines[-5:]}") from None
    return last[1]


async def stop(served: Served, signal_name: str, within: float) -> tuple[int, float]:
    """Send `signal_name` and wait for the exit; returns (exit code, seconds it took)."""
    started = time.monotonic()
    served.process.send_signal(getattr(signal, signal_name))
    code = await asyncio.wait_for(served.process.wait(), within)
    return code, time.monotonic() - started


def words(values: Iterable[str]) -> set[str]:
    return {word for value in values for word in re.split(r"[\s;&|()]+", value) if word}
