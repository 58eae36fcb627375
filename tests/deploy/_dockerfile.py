"""A small Dockerfile parser: enough of the reference syntax to read this repo's Dockerfile the way the
builder does (continuations, comments, ARG defaults in FROM, ENV expansion, exec-form JSON)."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ._harness import expand


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        if not self.value.startswith("["):
            return None
        parsed = json.loads(self.value)
        assert isinstance(parsed, list) and all(isinstance(part, str) for part in parsed), self
        return parsed

    def flags(self) -> tuple[dict[str, str], str]:
        """Leading `--name=value` options, and the rest of the value."""
        options: dict[str, str] = {}
        rest = self.value
        while match := re.match(r"--([\w-]+)=(\S+)\s*", rest):
            options[match.group(1)] = match.group(2)
            rest = rest[match.end() :]
        return options, rest


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The stage's ENV on top of `base`, each value expanded against what came before (as Docker does)."""
        env = dict(base or {})
        for instruction in self.all("ENV"):
            for key, value in parse_env(instruction.value, env).items():
                env[key] = value
        return env

    def declared_env(self) -> dict[str, str]:
        """Only the variables the stage's ENV instructions set (expanded against an empty base)."""
        return self.env({})


@dataclass
class Dockerfile:
    args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        [stage] = [s for s in self.stages if s.name == name]
        return stage


def logical_lines(text: str) -> list[tuple[int, str]]:
    """Instructions with their continuations joined and comment lines dropped (also inside continuations)."""
    out: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        out.append((start, " ".join(part for part in current if part)))
        current = []
    assert not current, "the Dockerfile ends inside a line continuation"
    return out


def parse_env(value: str, env: dict[str, str]) -> dict[str, str]:
    tokens = shlex.split(value, posix=True)
    if tokens and "=" not in tokens[0]:  # legacy `ENV key value`
        return {tokens[0]: expand(" ".join(tokens[1:]), env)}
    result: dict[str, str] = {}
    for token in tokens:
        key, sep, val = token.partition("=")
        assert sep, f"ENV token without '=': {token!r}"
        result[key] = expand(val, {**env, **result})
    return result


def parse(path: Path) -> Dockerfile:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line, text in logical_lines(path.read_text()):
        keyword, _, value = text.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            parts = value.split()
            image = expand(parts[0], args)
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=image, name=name))
        elif keyword == "ARG" and not stages:
            key, _, default = value.partition("=")
            args[key] = default
        else:
            assert stages, f"line {line}: {keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, value, line))
    return Dockerfile(args=args, stages=stages)
