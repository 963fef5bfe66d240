"""The dependency rules of the layers, read from the source (static imports, including function-level ones):

- no strategy imports an engine, the runner or the CLI (a method is engine-agnostic);
- no engine imports the runner or the CLI (the runner composes engines, never the reverse);
- no client module imports a strategy, an engine, the runner or the CLI (clients know no method by name);
- the protocol (the messages) imports neither strategies nor engines.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedlora"

RULES = {
    "fedlora.strategies": ("fedlora.engine", "fedlora.runner", "fedlora.cli"),
    "fedlora.engine": ("fedlora.runner", "fedlora.cli"),
    "fedlora.client": ("fedlora.strategies", "fedlora.engine", "fedlora.runner", "fedlora.cli"),
    "fedlora.protocol": ("fedlora.strategies", "fedlora.engine", "fedlora.runner", "fedlora.cli"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for layer, forbidden in RULES.items():
            if module == layer or module.startswith(layer + "."):
                for imported in imports_of(path):
                    if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                        found.append(f"{module} imports {imported}")
    return found


def test_layers_respect_their_dependency_rules() -> None:
    assert violations() == []


def test_the_rule_checker_sees_a_violation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself can fail: a strategy importing the runner is reported."""
    fake = tmp_path / "fedlora"
    (fake / "strategies").mkdir(parents=True)
    (fake / "strategies" / "bad.py").write_text("def f():\n    from fedlora.runner import run\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert violations() == ["fedlora.strategies.bad imports fedlora.runner"]
