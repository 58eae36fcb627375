"""Every command in the docs runs as typed from a fresh clone after `make run` (see `tests/docs/blocks.py` for what
is run, and how): a shell block in README.md or docs/*.md either runs to exit status 0 against a real `make run`, or
says why it is not run. Pages added later are picked up as they come."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.blocks import PORTS, ROOT, SHELLS, Addresses, Block, blocks, pages
from tests.helpers import free_port

RUNNABLE = {page: [b for b in blocks(page) if b.not_run is None] for page in pages()}
PAGE_TIMEOUT = 120.0


def test_every_shell_block_is_run_or_says_why_not() -> None:
    every = [block for page in pages() for block in blocks(page)]
    assert any(block.not_run is None for block in every), "no docs block is run at all"
    for block in every:
        assert block.not_run is None or len(block.not_run) >= 10, f"{block.where}: not-run needs a reason"
        assert block.text.strip(), f"{block.where}: an empty shell block"
    for page in pages():  # a marker anywhere else would leave the block it meant to mark running
        lines = page.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith("<!-- not-run"):
                following = lines[index + 1] if index + 1 < len(lines) else ""
                fence = re.match(r"^```(\w+)", following)
                assert fence and fence[1] in SHELLS, (
                    f"{page.name}:{index + 1}: a not-run marker not right before a shell block"
                )


def test_no_command_calls_the_virtualenvs_tools_by_bare_name() -> None:
    """`make run` puts them in .venv/bin, not on PATH: a bare `work-sidecar` or `grpcurl` is rc 127 for a new user.
    Only the command of each step counts: `pip install work-sidecar` names a package, `docker stop work-sidecar` a
    container."""
    for page in pages():
        for block in blocks(page):
            exported = "export PATH" in block.text  # a block that puts .venv/bin on PATH first
            for line in block.commands().splitlines():
                for command in commands_of(line):
                    bare = command in ("work-sidecar", "grpcurl", "pytest", "ruff", "mypy")
                    assert not bare or exported, f"{block.where}: `{command}` by bare name: use .venv/bin/{command}"


def commands_of(line: str) -> list[str]:
    """The command word of each step of a shell line: the first word after the start, `|`, `&&`, `||`, `;`, `(`
    or `$(`, past `VAR=value` assignments."""
    steps = re.split(r"\|\||&&|\||;|\$\(|\(", line.split(" #")[0])
    found = []
    for step in steps:
        words = [word for word in step.split() if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", word)]
        if words:
            found.append(words[0].rstrip(")`"))
    return found


def test_the_bare_name_check_sees_each_step_s_command() -> None:
    assert commands_of("FOO=1 work-sidecar serve | grpcurl x && (ruff check) ; echo $(mypy)") == [
        "work-sidecar", "grpcurl", "ruff", "echo", "mypy",
    ]  # fmt: skip
    assert commands_of("pip install work-sidecar  # then grpcurl") == ["pip"]
    assert commands_of("docker stop -t 45 work-sidecar") == ["docker"]


class MakeRun:
    """examples/python/demo.py (what `make run` runs) on addresses of its own, left running as `make run` is."""

    def __init__(self, tmp: Path) -> None:
        self.addresses = Addresses(
            tcp=f"127.0.0.1:{free_port()}",
            emulator_port=free_port(),
            tmp=tmp,
            ports={port: free_port() for port in PORTS},
        )
        self.log = tmp / "make-run.log"
        with self.log.open("w") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable, str(ROOT / "examples/python/demo.py"),
                    "--socket", str(tmp / "work-sidecar.sock"), "--tcp", self.addresses.tcp,
                    "--emulator-port", str(self.addresses.emulator_port),
                ],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=_fresh_environment() | {"WORK_SIDECAR_LOG_FORMAT": "text"},
            )  # fmt: skip

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while "Ctrl-C to drain" not in self.log.read_text():
            assert self.process.poll() is None, f"make run ended:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"make run did not finish its demo:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.2)  # polling a condition with a deadline

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # Ctrl-C: it drains its sidecar
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _fresh_environment() -> dict[str, str]:
    """A new user's shell: none of this project's variables, and the virtualenv not on PATH."""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("WORK_SIDECAR_", "VIRTUAL_ENV"))}
    return environment | {"PATH": path}


def _checkout(where: Path) -> Path:
    """The repository as a fresh clone after `make run` sees it: its files, and the tested virtualenv as `.venv`."""
    checkout = where / "checkout"
    checkout.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".venv", ".git"):
            (checkout / entry.name).symlink_to(entry)
    (checkout / ".venv").symlink_to(sys.prefix)  # the tested virtualenv, its pyvenv.cfg included
    return checkout


@pytest.fixture
def tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ws-docs-", dir="/tmp"))  # short: Unix socket paths live here
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _script(page_blocks: list[Block], addresses: Addresses) -> str:
    parts = ["set -e -o pipefail"]
    for block in page_blocks:
        parts.append(f"echo '==> {block.where}' >&2")
        parts.append(addresses.apply(block.commands()))
    return "\n".join(parts) + "\n"


@pytest.mark.timeout(PAGE_TIMEOUT + 60)
@pytest.mark.parametrize(
    "page", [page for page, runnable in RUNNABLE.items() if runnable], ids=lambda page: str(page.relative_to(ROOT))
)
def test_the_pages_commands_run_as_typed_after_make_run(page: Path, tmp: Path) -> None:
    make_run = MakeRun(tmp)
    try:
        make_run.wait_ready(timeout=60)
        script = _script(RUNNABLE[page], make_run.addresses)
        output = tmp / "page.log"
        with output.open("w") as out:
            shell = subprocess.Popen(
                ["bash", "-c", script], cwd=_checkout(tmp), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, env=_fresh_environment(),
            )  # fmt: skip
            try:
                code = shell.wait(timeout=PAGE_TIMEOUT)
            except subprocess.TimeoutExpired:
                code = None
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(shell.pid, signal.SIGKILL)  # whatever a block left in the background
                shell.wait()
        printed = output.read_text()
        failed = printed.rsplit("==> ", 1)[-1].split("\n", 1)[0] if "==> " in printed else "before the first block"
        assert code == 0, (
            f"{failed}: exit status {code}\n{printed[-4000:]}\n--- make run:\n{make_run.log.read_text()[-1500:]}"
        )
    finally:
        make_run.stop()
