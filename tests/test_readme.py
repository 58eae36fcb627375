"""The README documents every `serve` flag with its environment variable (the table is the contract)."""

from __future__ import annotations

from pathlib import Path

from sidecar.cli import SERVE_FLAGS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_starts_with_the_two_commands() -> None:
    head = README[:400]
    assert "make run" in head
    assert "make test" in head


def test_every_flag_is_in_the_configuration_table() -> None:
    for flag in SERVE_FLAGS:
        assert f"| `{flag.name}` | `{flag.env}` |" in README, f"{flag.name} is missing from the README table"


def _section(title: str) -> str:
    start = README.index(f"\n## {title}")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _commands(section: str) -> list[str]:
    return [line for block in section.split("```sh\n")[1:] for line in block.split("```")[0].splitlines()]


def test_make_run_timing_is_stated() -> None:
    head = README[: README.index("**work-sidecar** is")]
    assert "runtime" in head and "first item" in head
    assert "TIMING_PLACEHOLDER" not in README, "the measured time is in the README"


def test_node_and_go_sections_queue_before_once_and_say_what_keeps_running() -> None:
    for title, once in (("Node sandboxes", "--once"), ("Go sandboxes", "-once")):
        lines = _commands(_section(title))
        queue = next(i for i, line in enumerate(lines) if "/_emulator/environments/" in line)
        first_once = next(i for i, line in enumerate(lines) if f" {once}" in line)
        assert queue < first_once, f"{title}: an item is queued before {once}, which blocks until one comes"
        run = next(line for line in lines if line.startswith("make run"))
        assert "keeps running" in run, f"{title}: make run says it keeps running"
        long_running = next(line for line in lines if "--max-in-flight 2" in line or "-max-in-flight 2" in line)
        assert "keeps running" in long_running
        assert "WORK_SIDECAR_ADDR=" in long_running


def test_polyglot_deps_says_it_needs_root_and_gives_the_non_root_path() -> None:
    node = _section("Node sandboxes")
    assert "apt-installs" in node and "root" in node
    assert "npm ci" in node and "no root" in node.lower()
    assert "skipped" in node, "without root the Go tests are skipped, with the reason"
    script = (Path(__file__).resolve().parent.parent / "tools/install-polyglot-deps.sh").read_text()
    assert "needs root" in script and "skipping apt-get" in script


def test_exec_section_documents_the_child_environment() -> None:
    section = _section("The exec adapter")
    for name in ("WORK_SIDECAR_ADDR", "WORK_SIDECAR_LEASE_TOKEN", "TRACEPARENT", "started_at", "latest_heartbeat_at"):
        assert f"`{name}`" in section, name
    assert "always a valid W3C traceparent" in section
