"""`make run` (examples/python/demo.py): the sidecar on its embedded emulator, demo items enqueued, the
example sandbox takes and stops them all, and the grpcurl commands are printed. With real processes: one Ctrl-C
(SIGINT to the terminal's foreground process group) gives one clean drain, and a sidecar that dies is reported."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_make_run_demo_shows_the_whole_flow(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "examples/python/demo.py"), "--once", "--items", "2",
            "--socket", str(tmp_path / "demo.sock"), "--tcp", f"127.0.0.1:{free_port()}",
            "--emulator-port", str(free_port()),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.count("queued work_") == 2
    assert out.count("[sandbox] assigned work_") == 2
    assert out.count("state WORK_STATE_STOPPED") == 2
    assert "grpcurl" in out and "describe sidecar.work.v1.WorkService" in out
    assert "-emit-defaults" in out and "second terminal" in out
    assert "embedded Work API emulator" in result.stderr, "the first log line says the emulator is in use"


def test_sigterm_to_the_demo_stops_its_sidecar(tmp_path: Path) -> None:
    """Guarantee: `make run` stopped by SIGTERM (not only Ctrl-C) drains and stops its sidecar (no orphan)."""
    demo = subprocess.Popen(
        [
            sys.executable, str(ROOT / "examples/python/demo.py"), "--items", "1",
            "--socket", str(tmp_path / "demo.sock"), "--tcp", f"127.0.0.1:{free_port()}",
            "--emulator-port", str(free_port()),
        ],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert demo.stdout is not None
        for line in demo.stdout:  # the demo's own progress: wait until it idles, with the sidecar running
            if "Ctrl-C to drain" in line:
                break
        else:
            raise AssertionError("the demo ended before it idled")
        children = psutil.Process(demo.pid).children(recursive=True)
        assert any("serve" in child.cmdline() for child in children), "the sidecar runs as the demo's child"
        demo.terminate()
        assert demo.wait(timeout=30) == 128 + 15
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, "the sidecar was stopped with the demo"
    finally:
        demo.kill()


class Demo:
    """demo.py in its own session, as a shell runs it in the foreground: its process group is the terminal's
    foreground group, so `ctrl_c()` (SIGINT to that whole group) is exactly what a Ctrl-C at the terminal does."""

    def __init__(self, tmp_path: Path) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable, str(ROOT / "examples/python/demo.py"), "--items", "2",
                "--socket", str(tmp_path / "demo.sock"), "--tcp", f"127.0.0.1:{free_port()}",
                "--emulator-port", str(free_port()),
            ],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            env=os.environ | {"WORK_SIDECAR_LOG_FORMAT": "text"},
        )  # fmt: skip
        self.lines: list[str] = []

    def read_until(self, text: str) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"the demo ended before printing {text!r}:\n{self.output}")

    def finish(self, timeout: float = 60) -> int:
        assert self.process.stdout is not None
        self.lines.extend(self.process.stdout)  # to EOF: every process writing to the pipe has exited
        return self.process.wait(timeout=timeout)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def sidecar(self) -> psutil.Process:
        [sidecar] = [p for p in psutil.Process(self.process.pid).children() if "serve" in p.cmdline()]
        return sidecar

    def ctrl_c(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def close(self) -> None:
        with_children = [self.process.pid]
        with contextlib.suppress(psutil.NoSuchProcess):
            with_children += [p.pid for p in psutil.Process(self.process.pid).children(recursive=True)]
        for pid in with_children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    running = Demo(tmp_path)
    try:
        yield running
    finally:
        running.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("when", ["while the sandbox works", "while idle"])
def test_one_ctrl_c_gives_one_clean_drain(demo: Demo, when: str) -> None:
    demo.read_until("[sandbox] assigned" if when == "while the sandbox works" else "Ctrl-C to drain")
    sidecar = demo.sidecar()
    assert sidecar.pid == os.getpgid(sidecar.pid) != os.getpgid(demo.process.pid), "the sidecar has its own group"
    demo.ctrl_c()
    assert demo.finish() == 0, demo.output
    out = demo.output
    assert out.count("signal received: draining") == 1, out
    assert "second signal" not in out, "one Ctrl-C reached the sidecar once (as one SIGTERM from the demo)"
    assert "drained" in out and "the sidecar drained and exited (status 0)" in out, out
    assert "Traceback" not in out, out
    if when == "while the sandbox works":
        assert "[sandbox] the sidecar is draining" in out, "the sandbox got Draining, not the Ctrl-C"
        assert out.count("state WORK_STATE_STOPPED") == 2, "the sandbox finished and stopped both items"
        assert "[sandbox] done: 2 item(s)" in out
    assert not sidecar.is_running()


@pytest.mark.timeout(120)
def test_a_sidecar_that_dies_is_reported(demo: Demo) -> None:
    demo.read_until("Ctrl-C to drain")
    demo.sidecar().kill()  # kill -9
    assert demo.finish() == 1, demo.output
    assert "work-sidecar exited unexpectedly (killed by SIGKILL)" in demo.output
