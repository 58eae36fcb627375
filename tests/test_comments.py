"""Comments and docstrings in `sidecar/` state facts about the code:

- every name they cite in backticks exists: a module file (`_lease.py`), a dotted name (`_lease.Leases.claim`,
  `sidecar.core.LeasePolicy`, `pb.WorkAssigned`) or a class name (`LeaseObserver`), resolved against the code;
- no issue numbers (there is no tracker in the repository: say the fact, or nothing);
- no measured figures (milliseconds, microseconds, megabytes, percentages): figures belong to the benchmark results.

The generated packages (sidecar/work, sidecar/keda) are not read."""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import inspect
import io
import re
import tokenize
import types
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parents[1]
SIDECAR = ROOT / "sidecar"
GENERATED = ("work", "keda")

NOT_CODE = frozenset({"error.type", "error.details.current_state", "error.details.error_code", "details.current_state"})
"""Backticked dotted words that are not Python names: field paths in the Work API's JSON error body."""

_BACKTICKED = re.compile(r"`([^`\n]+)`")
_FILE = re.compile(r"[\w/.]*\w\.py")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+(?:\(\))?")
_CLASS = re.compile(r"_?[A-Z][a-z]\w*")
_ISSUE = re.compile(r"#\d+\b|\bissues?\s+#?\d+", re.IGNORECASE)
_FIGURE = re.compile(
    r"\d(?:[\d,.]*\d)?\s*(?:ms|µs|us|ns)\b"  # a duration below a second: what a machine took, not a setting
    r"|\b\d+(?:\.\d+)?\s*x\s+(?:faster|slower|cheaper)\b|\b(?:several|\d+) times (?:faster|slower|cheaper)\b"
    r"|%\s+of\s+(?:the\s+)?CPU|\bMB\s+of\s+(?:the\s+)?(?:idle\s+)?RSS",
    re.IGNORECASE,
)
"""Figures a measurement gives (durations in ms/µs/ns, "x faster", shares of the CPU or the RSS). Limits and
rules (1 MiB, 10 % of the TTL) are facts about the code and stay."""


def _source_files() -> list[Path]:
    return sorted(p for p in SIDECAR.rglob("*.py") if p.relative_to(SIDECAR).parts[0] not in GENERATED)


def _read_files() -> list[Path]:
    return _source_files()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def prose(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of every comment and every string statement (docstrings, attribute docstrings) of a file."""
    source = path.read_text(encoding="utf-8")
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            yield token.start[0], token.string
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            yield node.lineno, node.value.value


def _subtree(path: Path) -> Path:
    """The folder a bare name cited in `path` is looked up in: its top-level package (sidecar/core/ for
    sidecar/core/engine/_lease.py), or all of sidecar/ for a top-level module."""
    relative = path.relative_to(SIDECAR)
    return SIDECAR / relative.parts[0] if len(relative.parts) > 1 else SIDECAR


@cache
def _all_modules() -> dict[str, list[str]]:
    """Module basename -> full module names, for every sidecar module (generated ones included)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SIDECAR.rglob("*.py")):
        name = _module_name(path)
        found.setdefault(name.rpartition(".")[2], []).append(name)
    return found


@cache
def _defined_names() -> frozenset[str]:
    """Every name a sidecar module defines or imports, at module or class level, and every proto type name."""
    names: set[str] = set(dir(builtins))
    proto_modules: set[str] = set()
    for path in SIDECAR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.ImportFrom | ast.Import):
                names.update((alias.asname or alias.name).rpartition(".")[2] for alias in node.names)
                if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    proto_modules.update(f"{node.module}.{a.name}" for a in node.names if a.name.endswith("_pb2"))
            elif isinstance(node, ast.Assign):
                names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    for module in sorted(proto_modules):  # messages of imported protos: `ErrorInfo` (google.rpc)
        names.update(importlib.import_module(module).DESCRIPTOR.message_types_by_name)
    names.update(full_name.rpartition(".")[2] for full_name in _proto_names())
    return frozenset(names)


def _proto_names() -> Iterator[str]:
    for module_name in ("sidecar.work.v1.work_service_pb2", "sidecar.keda.externalscaler_pb2"):
        file = importlib.import_module(module_name).DESCRIPTOR
        yield from (service.full_name for service in file.services_by_name.values())
        stack = list(file.message_types_by_name.values())
        while stack:
            message = stack.pop()
            yield message.full_name
            yield from (f"{message.full_name}.{field.name}" for field in message.fields)
            stack.extend(message.nested_types)
        for enum in file.enum_types_by_name.values():
            yield enum.full_name
            yield from (f"{enum.full_name}.{value.name}" for value in enum.values)


_MISSING = object()
_DECLARED = object()


def _attribute(owner: Any, name: str) -> Any:
    """The attribute; `_DECLARED` for an instance attribute the class declares; `_MISSING` when there is none."""
    if isinstance(owner, types.ModuleType):
        if hasattr(owner, name):
            return getattr(owner, name)
        try:
            return importlib.import_module(f"{owner.__name__}.{name}")
        except ImportError:
            return _MISSING
    if hasattr(owner, name):
        return getattr(owner, name)
    if not isinstance(owner, type):
        return _MISSING
    if issubclass(owner, Message):
        descriptor = owner.DESCRIPTOR
        return _DECLARED if name in descriptor.fields_by_name or name in descriptor.oneofs_by_name else _MISSING
    for klass in owner.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return _DECLARED
        if dataclasses.is_dataclass(klass) and name in {f.name for f in dataclasses.fields(klass)}:
            return _DECLARED
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(name)}\s*(?::[^=\n]+)?=", source):
            return _DECLARED
    return _MISSING


def _walk(start: Any, attributes: list[str]) -> bool:
    current = start
    for index, name in enumerate(attributes):
        current = _attribute(current, name)
        if current is _MISSING:
            return False
        if current is _DECLARED:
            return index == len(attributes) - 1
    return True


def _starts(path: Path, first: str) -> Iterator[Any]:
    """What the first part of a dotted name cited in `path` can be."""
    module = importlib.import_module(_module_name(path))
    if hasattr(module, first):
        yield getattr(module, first)
    for generated in ("sidecar.work.v1.work_service_pb2", "sidecar.keda.externalscaler_pb2"):
        if hasattr(importlib.import_module(generated), first):  # a proto message: `WatchWorkRequest.resume`
            yield getattr(importlib.import_module(generated), first)
    subtree = _module_name(_subtree(path) / "__init__.py")
    for full in _all_modules().get(first, []):
        if full.startswith(subtree) and not full.endswith("__main__"):
            yield importlib.import_module(full)
    for other in _source_files():  # a class another module of the same package defines (`Sidecar.start`)
        if other.is_relative_to(_subtree(path)) and other.name != "__main__.py":
            candidate = importlib.import_module(_module_name(other))
            if isinstance(getattr(candidate, first, None), type) and getattr(candidate, first).__module__ == (
                candidate.__name__
            ):
                yield getattr(candidate, first)
    if hasattr(builtins, first):
        yield getattr(builtins, first)


def resolves(path: Path, cited: str) -> bool:
    """Whether a backticked name cited in `path` exists in the code."""
    if _FILE.fullmatch(cited):
        if "/" in cited:
            return (ROOT / cited).is_file() or (SIDECAR / cited).is_file()
        return any(_subtree(path).rglob(cited))
    if _CLASS.fullmatch(cited):
        return cited in _defined_names()
    parts = cited.removesuffix("()").split(".")
    if cited in NOT_CODE or ".".join(parts) in set(_proto_names()):
        return True
    for split in range(len(parts), 0, -1):  # a full module path: `sidecar.core.LeasePolicy`, `google.rpc`
        try:
            module = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        if _walk(module, parts[split:]):
            return True
        break
    return any(_walk(start, parts[1:]) for start in _starts(path, parts[0]))


def cited_names(path: Path) -> Iterator[tuple[int, str]]:
    for line, text in prose(path):
        for match in _BACKTICKED.finditer(text):
            cited = match.group(1).strip()
            if _FILE.fullmatch(cited) or _DOTTED.fullmatch(cited) or _CLASS.fullmatch(cited):
                yield line, cited


def test_every_name_a_comment_cites_exists() -> None:
    missing = [
        f"{path.relative_to(ROOT)}:{line}: `{cited}`"
        for path in _read_files()
        for line, cited in cited_names(path)
        if not resolves(path, cited)
    ]
    assert not missing, "comments cite names that do not exist:\n" + "\n".join(missing)


def test_architecture_md_cites_only_names_that_exist() -> None:
    """ARCHITECTURE.md names modules by file (`core/engine/_policy.py`, `_lease.py`) and code by dotted name
    (`_lease.Leases.claim`): each resolves as a comment in `sidecar/__init__.py` would."""
    page = ROOT / "ARCHITECTURE.md"
    missing = [
        f"ARCHITECTURE.md: `{cited}`"
        for cited in dict.fromkeys(match.group(1).strip() for match in _BACKTICKED.finditer(page.read_text()))
        if (_FILE.fullmatch(cited) or _DOTTED.fullmatch(cited) or _CLASS.fullmatch(cited))
        and not resolves(SIDECAR / "__init__.py", cited)
    ]
    assert not missing, "ARCHITECTURE.md cites names that do not exist:\n" + "\n".join(missing)


def test_no_issue_numbers_or_measured_figures_in_comments() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{line}: {match.group(0)!r}"
        for path in _read_files()
        for line, text in prose(path)
        for pattern in (_ISSUE, _FIGURE)
        for match in pattern.finditer(text)
    ]
    assert not found, "issue numbers or measured figures in comments/docstrings:\n" + "\n".join(found)


@pytest.mark.parametrize(
    ("cited", "exists"),
    [
        ("_lease.Leases.claim", True),
        ("Leases.tokens", True),  # an instance attribute set in __init__
        ("WatchWorkRequest.resume", True),  # a proto field
        ("sidecar.work.v1.WorkService", True),  # a proto service
        ("sidecar.core.LeasePolicy", True),
        ("_tokens.py", True),
        ("_observer.py", False),
        ("_handover.WatcherNotifier", False),
        ("Leases.no_such_transition", False),
        ("WatcherNotifier", False),
        ("sidecar.core.NoSuchSetting", False),
    ],
)
def test_the_resolver_tells_names_that_exist_from_names_that_do_not(cited: str, exists: bool) -> None:
    assert resolves(SIDECAR / "core" / "engine" / "_lease.py", cited) is exists
