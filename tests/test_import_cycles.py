"""No import cycles among the `sidecar` modules: every `import` and `from … import` counts, at module level or inside a
function, except those under `if TYPE_CHECKING:` (never executed). Read from the source with `ast`, so a cycle that
today's import order happens to survive still fails, with the cycle printed."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SIDECAR = Path(__file__).resolve().parents[1] / "sidecar"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SIDECAR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(SIDECAR.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The sidecar modules an import statement runs: `from pkg import sub` is `pkg.sub` when that is a module, else
    `pkg` (its `__init__`). A package's parents, which Python imports first, are not counted as dependencies."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in MODULES)
        return
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join([*base, *([node.module] if node.module else [])])
    else:
        source = node.module or ""
    for alias in node.names:
        if f"{source}.{alias.name}" in MODULES:
            yield f"{source}.{alias.name}"
        elif source in MODULES:
            yield source


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[module] = {target for node in _imports(tree) for target in _targets(module, node)} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path that closes."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(_path_within(graph, component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _path_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A closed path through the component from its first module (breadth first: a shortest one)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for successor in sorted(graph[node] & component):
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # pragma: no cover


def test_the_sidecar_modules_import_each_other_without_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (move the shared part into a module both can import):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found
    )


def test_the_checker_finds_a_cycle_through_a_function_level_import_and_skips_type_checking() -> None:
    """The checker itself: a function-level import closes a cycle; one under `if TYPE_CHECKING:` does not."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .core import Sidecar\n"
        "def main():\n    from .scaler import main\n"
    )
    targets = {target for node in _imports(ast.parse(source)) for target in _targets("sidecar.cli", node)}
    assert targets == {"sidecar.scaler"}


CORE = "sidecar.core"
LAYER_IMPORTS: dict[str, frozenset[str]] = {
    # layer: what its modules may import from sidecar.core (a folder, or one module of another folder)
    "engine": frozenset({"engine", "sidecar.core._telemetry", "sidecar.core.edge._convert",
                         "sidecar.core.edge._status", "sidecar.core.persistence._tokens"}),
    "edge": frozenset({"edge", "engine", "sidecar.core._telemetry"}),
    "persistence": frozenset({"persistence", "engine", "sidecar.core._telemetry"}),
    "outside": frozenset({"sidecar.core", "sidecar.core.edge._status"}),
}  # fmt: skip
"""The layers of sidecar/core as ARCHITECTURE.md draws them. The composition root (sidecar/core/_server.py, with
_config.py and the package itself) may import every layer; no layer imports it back, and the rest of `sidecar`
goes through the package `sidecar.core` (the scaler also builds its gRPC errors with the edge's `_status`)."""


def _layer(module: str) -> str | None:
    """'engine', 'edge', 'persistence', 'root' (sidecar/core's own modules) or 'outside' (the rest of sidecar)."""
    if module != CORE and not module.startswith(CORE + "."):
        return "outside"
    parts = module.split(".")
    return parts[2] if len(parts) > 3 else "root"


def _allowed(source: str, target: str) -> bool:
    if not (target == CORE or target.startswith(CORE + ".")):
        return True
    layer = _layer(source)
    if layer == "root":
        return True
    allowed = LAYER_IMPORTS[layer or "outside"]
    return target in allowed or _layer(target) in allowed


def test_the_core_layers_import_only_what_architecture_md_says() -> None:
    graph = import_graph()
    crossing = sorted(
        f"{source} -> {target}"
        for source, targets in graph.items()
        for target in targets
        if not _allowed(source, target)
    )
    assert not crossing, "imports across the layers of sidecar/core (see ARCHITECTURE.md, 'Layers'):\n" + "\n".join(
        crossing
    )


def test_the_layer_rule_refuses_what_it_should() -> None:
    assert not _allowed("sidecar.core.engine._lease", "sidecar.core.edge._service")
    assert not _allowed("sidecar.core.edge._service", "sidecar.core._server")
    assert not _allowed("sidecar.core.persistence._journal", "sidecar.core.edge._status")
    assert not _allowed("sidecar.cli", "sidecar.core.engine._lease")
    assert _allowed("sidecar.core._server", "sidecar.core.persistence._journal")
    assert _allowed("sidecar.core.edge._service", "sidecar.core.engine._lease")
