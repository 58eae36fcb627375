"""examples/node: its own end-to-end test (`node --test examples/node/`: a real sidecar process in demo mode, items
enqueued through the emulator's admin API, the sandbox run as a child process) must pass.

Guarantee checked: a sandbox written with plain @grpc/grpc-js and the .proto takes items to `stopped` (argv and
environment addresses, Unix socket and TCP), ends work early on a platform stop request and leaves on Draining. The
node test waits for the sidecar on gRPC health (not a log line) and keeps its files in TMPDIR, which it empties."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT, require, require_path, require_tool

NODE_DIR = ROOT / "examples" / "node"


def _node() -> str:
    node = require_tool("node", "the Node example sandbox and its test run on Node.js")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    found = re.match(r"v(\d+)", version)
    major = int(found.group(1)) if found else 0
    require(major >= 18, f"node {version} is too old: the example needs Node.js >= 18 (node --test, fetch)")
    for package in ("@grpc/grpc-js", "@grpc/proto-loader"):
        require_path(NODE_DIR / "node_modules" / package / "package.json", f"{package} (npm ci in examples/node)")
    return node


@pytest.mark.polyglot
@pytest.mark.timeout(240)
def test_node_example_sandbox_end_to_end(tmp_path: Path) -> None:
    node = _node()
    scratch = tmp_path / "tmp"  # the node test's os.tmpdir(): nothing of it may be left in /tmp
    scratch.mkdir()
    env = os.environ | {
        "WORK_SIDECAR_BIN": str(Path(sys.executable).parent / "work-sidecar"),  # this venv's
        "TMPDIR": str(scratch),
    }
    # Its own process group: on a timeout or failure the node test runner and the sidecars it started all go.
    process = subprocess.Popen(
        [node, "--test", "examples/node/"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = process.communicate(timeout=200)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 0, out[-6000:]
    assert re.search(r"^# pass 5$", out, re.MULTILINE), out[-3000:]
    assert re.search(r"^# fail 0$", out, re.MULTILINE), out[-3000:]
    assert "# skipped 0" in out
    assert not list(scratch.iterdir()), "the node test removed the sidecar directories it made"
