"""No import cycles among flashtune's modules: each import statement, at the top of a module or inside a
function, is an edge; a cycle is a strongly connected set of two or more modules.

Imports only type checkers read (under `if TYPE_CHECKING:`) are not edges, and `from package import name`
is an edge to the submodule when `name` is one, else to the package.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"kernel": "flashtune.kernel", "db": "flashtune.db", "tuner": "flashtune.tuner"}


def _modules(root: Path) -> dict[str, Path]:
    found = {}
    for top, package in ROOTS.items():
        for path in (root / top).rglob("*.py"):
            rel = path.relative_to(root / top)
            parts = [package, *rel.parts[:-1]] + ([] if rel.name == "__init__.py" else [rel.stem])
            found[".".join(parts)] = path
    return found


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """module -> the flashtune modules it imports."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(branch.test) for node in ast.walk(branch)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
                targets = subs if len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected sets of two or more modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_no_module_imports_itself_through_others() -> None:
    graph = import_graph()
    assert len(graph) > 80
    assert cycles(graph) == []


def test_a_cycle_is_found(tmp_path: Path) -> None:
    for top in ROOTS:
        (tmp_path / top).mkdir()
        (tmp_path / top / "__init__.py").write_text("")
    (tmp_path / "kernel" / "a.py").write_text("from . import b\n")
    (tmp_path / "kernel" / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "db" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from ..kernel import a\n")
    assert cycles(import_graph(tmp_path)) == [["flashtune.kernel.a", "flashtune.kernel.b"]]
