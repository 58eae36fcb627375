"""The README fits on two screens and points at everything; the pages hold what it used to (the layout tests that
pinned the README's sections follow their content here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sidecar.cli import SERVE_FLAGS
from tests.docs.blocks import ROOT

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
OTHER_HELPERS_PAGES = ("deployment", "telemetry", "install", "configuration", "chaos", "scaler")
"""Pages the README links to whether or not this checkout has them yet."""


def _section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _commands(section: str) -> list[str]:
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", section, re.DOTALL)
    return [line for block in blocks for line in block.splitlines()]


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_readme_fits_on_two_screens() -> None:
    lines = README.splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    assert not [line for line in lines if line.startswith("|")], "no tables in the README: they belong to docs/"
    assert max(len(line) for line in lines) <= 300


def test_readme_says_what_it_is_then_the_diagram_then_the_two_commands() -> None:
    assert README.index("**work-sidecar** is") < README.index("┌") < README.index("## Two commands")
    commands = _section(README, "Two commands")
    assert "make run" in commands and "make test" in commands


def test_make_run_and_make_test_times_say_on_what_machine() -> None:
    commands = _section(README, "Two commands")
    assert "first item" in commands and "make test" in commands
    assert "2-core" in commands and "load average" in commands, "a time without its machine and load is not a fact"
    assert "TIMING_PLACEHOLDER" not in README


def test_readme_python_sandbox_is_the_example_program_verbatim() -> None:
    [program] = re.findall(r"```python\n(.*?)```", README, re.DOTALL)
    assert program == (ROOT / "examples/python/client_sandbox.py").read_text()
    assert "examples/python/client_sandbox.py" in "".join(_commands(_section(README, "A Python sandbox")))


def test_readme_links_every_docs_page() -> None:
    linked = set(re.findall(r"\]\(docs/([\w-]+)\.md", README))
    pages = {page.stem for page in DOCS.glob("*.md")} | set(OTHER_HELPERS_PAGES)
    assert pages <= linked, f"not linked from the README: {sorted(pages - linked)}"
    assert "(ARCHITECTURE.md)" in README


def test_every_guarantee_is_one_readme_line_linking_its_section() -> None:
    guarantees = (DOCS / "guarantees.md").read_text()
    sections = [anchor(h) for h in re.findall(r"^## (.+)$", guarantees, re.MULTILINE)]
    lines = [line for line in README.splitlines() if "](docs/guarantees.md#" in line]
    linked = [re.search(r"docs/guarantees.md#([\w-]+)", line)[1] for line in lines]  # type: ignore[index]
    assert linked == sections, "one README line per guarantee, in the page's order"
    assert "## A lost answer never costs the lease" in guarantees


def test_every_flag_is_in_the_configuration_page() -> None:
    """The flag table left the README for docs/configuration.md (generated from the flag definitions)."""
    page = DOCS / "configuration.md"
    if not page.exists():
        pytest.skip("docs/configuration.md is generated on the layers branch (from the flag definitions)")
    text = page.read_text()
    for flag in SERVE_FLAGS:
        assert f"`{flag.name}`" in text and flag.env in text, f"{flag.name} is missing from docs/configuration.md"


def test_node_and_go_sections_queue_before_once_and_say_what_keeps_running() -> None:
    sandboxes = (DOCS / "sandboxes.md").read_text()
    for title, once in (("Node sandboxes", "--once"), ("Go sandboxes", "-once")):
        lines = _commands(_section(sandboxes, title))
        queue = next(i for i, line in enumerate(lines) if "/_emulator/environments/" in line)
        first_once = next(i for i, line in enumerate(lines) if f" {once}" in line)
        assert queue < first_once, f"{title}: an item is queued before {once}, which blocks until one comes"
        run = next(line for line in lines if line.startswith("make run"))
        assert "keeps running" in run, f"{title}: make run says it keeps running"
        long_running = next(line for line in lines if "--max-in-flight 2" in line or "-max-in-flight 2" in line)
        assert "keeps running" in long_running
        assert "WORK_SIDECAR_ADDR=" in long_running


def test_polyglot_deps_says_it_needs_root_and_gives_the_non_root_path() -> None:
    node = _section((DOCS / "sandboxes.md").read_text(), "Node sandboxes")
    assert "apt-installs" in node and "root" in node
    assert "npm ci" in node and "no root" in node.lower()
    assert "skipped" in node, "without root the Go tests are skipped, with the reason"
    script = (ROOT / "tools/install-polyglot-deps.sh").read_text()
    assert "needs root" in script and "skipping apt-get" in script


def test_exec_section_documents_the_child_environment() -> None:
    section = _section((DOCS / "sandboxes.md").read_text(), "The exec adapter")
    for name in ("WORK_SIDECAR_ADDR", "WORK_SIDECAR_LEASE_TOKEN", "TRACEPARENT", "started_at", "latest_heartbeat_at"):
        assert f"`{name}`" in section, name
    assert "always a valid W3C traceparent" in section


def test_one_socket_path_for_make_run_and_the_examples() -> None:
    """`make run`, the example sandboxes' defaults and the docs agree on where the sidecar listens."""
    default = "/tmp/work-sidecar.sock"
    assert f'default="{default}"' in (ROOT / "examples/python/demo.py").read_text()
    for example in ("examples/python/sandbox.py", "examples/node/sandbox.js", "examples/go/main.go"):
        assert f"unix://{default}" in (ROOT / example).read_text(), example
    for page in (ROOT / "README.md", *DOCS.glob("*.md")):
        for found in re.findall(r"unix://(/[\w./-]+)", page.read_text()):
            assert found.startswith(("/tmp/work-sidecar", "/var/run/work-sidecar", "/path", "/absolute/path")), (
                f"{page.name}: {found}"
            )


def test_pages_link_only_to_files_that_exist_or_that_other_pages_bring() -> None:
    for page in (ROOT / "README.md", *DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            path = (page.parent / target).resolve()
            bring = path.parent == DOCS and path.stem in OTHER_HELPERS_PAGES
            assert path.exists() or bring, f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_guarantee_anchor_matches_github() -> None:
    assert anchor("Start-up fails loudly, never harmfully") == "start-up-fails-loudly-never-harmfully"
    assert anchor("Bad input gets a clear error and costs nothing") == "bad-input-gets-a-clear-error-and-costs-nothing"


def test_a_docs_page_links_to_sections_that_exist() -> None:
    for page in (ROOT / "README.md", *DOCS.glob("*.md")):
        for target, fragment in re.findall(r"\]\(([\w./-]*\.md)#([\w-]+)\)", page.read_text()):
            path = (page.parent / target).resolve()
            if not path.exists():
                continue  # a page another branch brings
            headings = {anchor(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.MULTILINE)}
            assert fragment in headings, f"{page.relative_to(ROOT)}: {target}#{fragment} names no heading"


def test_readme_section_for_the_grpcurl_walkthrough_moved() -> None:
    assert "docs/getting-started.md#the-grpcurl-walkthrough" in README
    assert Path(ROOT / "docs/getting-started.md").read_text().count("## The grpcurl walkthrough") == 1
