"""docs/guarantees.md: every guarantee names what attacks it, and every test, test file and chaos scenario it names
exists (a renamed or deleted test shows up here, not as a claim nobody checks)."""

from __future__ import annotations

import re

from tests.docs.blocks import ROOT

PAGE = (ROOT / "docs" / "guarantees.md").read_text()
PLACEHOLDER = "_to be filled in"
"""A guarantee whose attackers are still being written says so in these words (and nothing else may)."""


def _sections() -> dict[str, str]:
    parts = re.split(r"^## (.+)$", PAGE, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def _attackers(body: str) -> list[str]:
    assert "Attacked by:" in body
    return [line[2:] for line in body.split("Attacked by:", 1)[1].splitlines() if line.startswith("- ")]


def _scenarios() -> set[str]:
    source = (ROOT / "chaos" / "scenarios.py").read_text()
    return set(re.findall(r'Scenario\(\s*"([\w-]+)"', source))


def test_every_guarantee_has_attackers() -> None:
    sections = _sections()
    assert len(sections) >= 12
    for title, body in sections.items():
        attackers = _attackers(body)
        assert attackers, f"{title}: a guarantee without an attacker is a claim"
        assert not any(PLACEHOLDER in line for line in attackers), f"{title}: an attacker list still to be filled"


def test_every_named_test_file_and_scenario_exists() -> None:
    scenarios = _scenarios()
    named = 0
    for title, body in _sections().items():
        for line in _attackers(body):
            for path, _, test in re.findall(r"`(tests/[\w/]+\.py)(::(\w+))?`", line):
                source = ROOT / path
                assert source.exists(), f"{title}: {path} does not exist"
                named += 1
                if test:
                    assert re.search(rf"^(async )?def {test}\(", source.read_text(), re.MULTILINE), (
                        f"{title}: {path} has no test {test}"
                    )
            if line.startswith("chaos "):
                for scenario in re.findall(r"`([\w-]+)`", line):
                    assert scenario in scenarios, f"{title}: chaos scenario {scenario} does not exist"
    assert named >= 40
