"""The package's import drawing: no module circle, and the rooms form layers with at most one
upward import (issue 20). Function-level imports count (a circle hidden in a function is still
a circle a reader has to follow); annotations under ``TYPE_CHECKING`` do not (nothing is
imported at run time). A room is a sub-package or a top-level module."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_adadpo"


def _modules() -> dict[str, Path]:
    """``megatron_adadpo.a.b`` -> its file (a package is its ``__init__.py``)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(module: str, path: Path, node: ast.AST) -> list[str]:
    """Names ``node`` imports from the package (``from x import y`` yields x and x.y)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        anchor = module.split(".")
        if path.name != "__init__.py":
            anchor = anchor[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _type_only(tree: ast.AST) -> set[int]:
    """Nodes under ``if TYPE_CHECKING:`` (annotations only: no import at run time)."""
    nodes = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            nodes.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return nodes


def module_edges() -> set[tuple[str, str]]:
    """(importer, imported module) pairs inside the package, parents excluded; function-level
    imports count, ``TYPE_CHECKING`` ones do not."""
    modules = _modules()
    edges = set()
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        type_only = _type_only(tree)
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            for name in _imported(module, path, node):
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module and not module.startswith(name + "."):
                    if name.startswith("megatron_adadpo."):
                        edges.add((module, name))
    return edges


def _room(module: str) -> str:
    """``megatron_adadpo.run.state.lock`` -> ``run``; the package itself is ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycle_free(edges: set[tuple[str, str]]) -> bool:
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    state: dict[str, int] = {}

    def visit(node: str) -> bool:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1 or (nxt not in state and not visit(nxt)):
                return False
        state[node] = 2
        return True

    return all(visit(n) for n in list(graph) if n not in state)


def test_no_module_imports_itself_through_a_circle():
    edges = module_edges()
    assert _cycle_free(edges), sorted((a, b) for a, b in edges if (b, a) in edges)


def test_rooms_form_layers_with_at_most_one_upward_import():
    rooms = {(_room(a), _room(b)) for a, b in module_edges() if _room(a) != _room(b)}
    assert _cycle_free(rooms) or upward_imports(), f"more than one upward import: {sorted(rooms)}"
    assert set(upward_imports()) <= {("config", "run")}  # config.check_environment, only


def test_the_checker_sees_a_circle_and_the_imports():
    assert not _cycle_free({("a", "b"), ("b", "c"), ("c", "a")})
    assert _cycle_free({("a", "b"), ("b", "c"), ("a", "c")})
    edges = module_edges()
    assert ("megatron_adadpo.run.trainer", "megatron_adadpo.run.step") in edges
    assert ("megatron_adadpo.config", "megatron_adadpo.run.state.consistency") in edges  # in a def


def upward_imports() -> list[tuple[str, str]]:
    """The room imports that go against the layers (one is allowed: config.check_environment's
    look at the files a config names, ``run/state/consistency.py``)."""
    rooms = {(_room(a), _room(b)) for a, b in module_edges() if _room(a) != _room(b)}
    return [] if _cycle_free(rooms) else [e for e in rooms if _cycle_free(rooms - {e})]
