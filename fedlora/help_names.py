"""The registered names for ``fedlora --help`` without importing torch: the built-ins read from fedlora's
own source (the ``@register_*("name")`` decorators, each ``@register_strategy`` class's ``name = "..."``,
the generation scorers' ``SCORERS`` keys), and the names of installed entry points (not loaded).

``tests/unit/test_cli.py`` checks these against the live registries after every built-in is imported, so a
method registered another way fails that test rather than vanishing from the help. A config's
``plugins:`` are not imported here: ``fedlora config`` and the run's errors list those too.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

#: help row -> (the modules holding its built-ins, the decorator that registers one, entry-point group)
ROWS: dict[str, tuple[tuple[str, ...], str, str]] = {
    "strategy.name": (("strategies/*.py",), "register_strategy", "fedlora.strategies"),
    "data.source": (("data/federation.py",), "register_data_source", "fedlora.data_sources"),
    "partition.method": (("data/partition.py",), "register_partitioner", "fedlora.partitioners"),
    "eval.metrics": (("eval/registry.py", "eval/generation.py"), "register_metric", "fedlora.metrics"),
}


def _decorator_name(node: ast.expr) -> tuple[str, str | None]:
    """``@register_x`` -> (register_x, None); ``@register_x("name", ...)`` -> (register_x, "name")."""
    call = node if isinstance(node, ast.Call) else None
    target = call.func if call else node
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
    literal = None
    if call and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        literal = call.args[0].value
    return name, literal


def _class_name_attribute(cls: ast.ClassDef) -> str | None:
    for statement in cls.body:
        targets = statement.targets if isinstance(statement, ast.Assign) else []
        if isinstance(statement, ast.AnnAssign):
            targets = [statement.target]
        value = getattr(statement, "value", None)
        for target in targets:
            if isinstance(target, ast.Name) and target.id == "name" and isinstance(value, ast.Constant):
                return str(value.value)
    return None


def names_in_source(tree: ast.Module, decorator: str) -> list[str]:
    """The names ``decorator`` registers in one module: decorated functions and classes, and the keys of a
    module-level ``SCORERS = {...}`` (the generation metrics, registered in a loop over it)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            for dec in node.decorator_list:
                called, literal = _decorator_name(dec)
                if called != decorator:
                    continue
                if literal is not None:
                    found.append(literal)
                elif isinstance(node, ast.ClassDef) and (attr := _class_name_attribute(node)) is not None:
                    found.append(attr)
        if (
            decorator == "register_metric"
            and isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "SCORERS" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            found += [
                k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)
            ]
    return found


@functools.cache
def builtin_names() -> dict[str, list[str]]:
    """Each help row's built-in names, sorted (the sources parsed once per process; read, never change)."""
    out: dict[str, list[str]] = {}
    for row, (patterns, decorator, _) in ROWS.items():
        names: set[str] = set()
        for pattern in patterns:
            for path in sorted(PACKAGE.glob(pattern)):
                names.update(names_in_source(ast.parse(path.read_text()), decorator))
        out[row] = sorted(names)
    return out


def help_names() -> str:
    """The built-ins and installed entry points, one line per config field, as ``--help`` prints them."""
    from importlib.metadata import entry_points

    lines = []
    for row, names in builtin_names().items():
        plugged = {point.name for point in entry_points(group=ROWS[row][2])}
        lines.append(f"  {row}: {', '.join(sorted(set(names) | plugged))}")
    from fedlora.eval.benchmarks import BENCHMARK_TASKS  # no torch at import

    lines.append(f"  eval.tasks: {', '.join(BENCHMARK_TASKS)}")
    return "\n".join(lines)
