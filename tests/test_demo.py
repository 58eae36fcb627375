"""`make run` (examples/python/demo.py): the sidecar on its embedded emulator, demo items enqueued, the
example sandbox takes and stops them all, and the grpcurl commands are printed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
    assert "embedded Work API emulator" in result.stderr, "the first log line says the emulator is in use"


def test_sigterm_to_the_demo_stops_its_sidecar(tmp_path: Path) -> None:
    """Guarantee: `make run` stopped by SIGTERM (not only Ctrl-C) drains and stops its sidecar (no orphan)."""
    import psutil

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
