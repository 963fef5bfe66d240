"""The package's import graph, read from the source: every ``import`` and ``from ... import`` (function-level,
``TYPE_CHECKING`` and relative ones included) and every string constant that names a fedlora module (what
``importlib.import_module("fedlora....")`` or a registry's list of modules would import).

- no import circle anywhere in ``fedlora/`` (no strongly connected component of two or more modules);
- leaves: ``fedlora.errors`` / ``fedlora.version`` import nothing of fedlora, ``fedlora.registry`` only the
  errors, ``fedlora.compute`` only the errors, ``fedlora.config`` only itself and the errors (a schema and a
  YAML reader: no registry, no method);
- layers: no strategy imports an engine, a run session, the runner or the CLI (a method is engine-agnostic);
  no engine imports a session, the runner or the CLI (they compose engines, never the reverse); no client
  module imports a strategy, an engine, a session, the preflight, the runner or the CLI (clients know no
  method by name); the protocol imports no strategy, engine or session; evaluation no strategy, engine,
  session or runner.

A package's ``__init__`` counts only for what it imports itself (importing ``a.b`` runs ``a/__init__`` first,
which is not an edge from ``a.b`` to ``a``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fedlora"

COMPOSERS = ("fedlora.session", "fedlora.runner", "fedlora.cli", "fedlora.sweep")
#: module prefix -> the fedlora modules it may import (and nothing else of fedlora)
ONLY = {
    "fedlora.errors": (),
    "fedlora.version": (),
    "fedlora.registry": ("fedlora.errors",),
    "fedlora.compute": ("fedlora.errors",),
    "fedlora.config": ("fedlora.config", "fedlora.errors"),
}
#: module prefix -> the fedlora modules it must not import
FORBIDDEN = {
    "fedlora.strategies": ("fedlora.engine", "fedlora.preflight", *COMPOSERS),
    "fedlora.engine": COMPOSERS,
    "fedlora.client": ("fedlora.strategies", "fedlora.engine", "fedlora.preflight", *COMPOSERS),
    "fedlora.protocol": ("fedlora.strategies", "fedlora.engine", *COMPOSERS),
    "fedlora.eval": ("fedlora.strategies", "fedlora.engine", "fedlora.preflight", *COMPOSERS),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """The fedlora modules ``path`` imports: each named module resolved to the longest known module."""
    module = module_name(path)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{base}" if base else package
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else resolve(base))
        elif (
            isinstance(node, ast.Constant) and str(node.value).startswith("fedlora.") and node.value in known
        ):
            found.add(str(node.value))
    return {name for name in found if name and name.startswith("fedlora") and name != module}


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of two or more modules (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imported in sorted(graph.items()):
        for prefix, allowed in ONLY.items():
            if within(module, prefix):
                found += [
                    f"{module} imports {name}"
                    for name in sorted(imported)
                    if not any(within(name, a) for a in allowed)
                ]
        for prefix, forbidden in FORBIDDEN.items():
            if within(module, prefix):
                found += [
                    f"{module} imports {name}"
                    for name in sorted(imported)
                    if any(within(name, f) for f in forbidden)
                ]
    return found


def test_no_import_circle_anywhere_in_the_package() -> None:
    assert cycles(import_graph()) == []


def test_layers_respect_their_dependency_rules() -> None:
    assert violations(import_graph()) == []


def test_the_checker_sees_a_circle_an_importlib_string_and_a_layer_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checks themselves can fail: a circle through a function-level import and a registry's string, a
    client naming a strategy module in a string, and a config module importing a registry are all found."""
    fake = tmp_path / "fedlora"
    for folder in ("strategies", "client", "config"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "registry.py").write_text("")
    (fake / "strategies" / "base.py").write_text("from fedlora.client.hooks import Hook\n")
    (fake / "client" / "hooks.py").write_text('MODULES = ("fedlora.strategies.base",)\nclass Hook: ...\n')
    (fake / "config" / "loader.py").write_text("def check():\n    from fedlora.registry import Registry\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    graph = import_graph()
    assert cycles(graph) == [["fedlora.client.hooks", "fedlora.strategies.base"]]
    assert violations(graph) == [
        "fedlora.client.hooks imports fedlora.strategies.base",
        "fedlora.config.loader imports fedlora.registry",
    ]
