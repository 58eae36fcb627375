"""No import cycles among the `sidecar` modules: every `import` and `from … import` counts, at module level or inside a
function, except those under `if TYPE_CHECKING:` (never executed). Read from the source with `ast`, so a cycle that
today's import order happens to survive still fails, with the cycle printed."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SIDECAR = Path(__file__).resolve().parents[1] / "sidecar"

TOLERATED: dict[frozenset[str], str] = {
    frozenset({"sidecar.workapi._lean", "sidecar.workapi._transport"}): (
        "the HTTP backends behind one seam (sidecar/workapi/_transports/) remove it: delete this entry then"
    ),
}
"""Cycles known and being removed elsewhere; an entry that is no longer a cycle fails the test, so it cannot linger."""


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
    new = [cycle for cycle in found if frozenset(cycle) not in TOLERATED]
    assert not new, "import cycles (move the shared part into a module both can import):\n" + "\n".join(
        " -> ".join(cycle) for cycle in new
    )
    gone = set(TOLERATED) - {frozenset(cycle) for cycle in found}
    assert not gone, f"no longer cycles, remove them from TOLERATED: {[sorted(entry) for entry in gone]}"


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
