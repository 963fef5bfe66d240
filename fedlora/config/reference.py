"""Every config key with its default and its help, read from the schema itself (``fedlora config``,
``docs/config-reference.md``).

A key's help is the comment block right above its field in the section's source (``#:`` or ``#`` lines);
a section's is its docstring's first paragraph. Nothing is written twice: the schema is the reference.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from fedlora.config.schema import ExperimentConfig
from fedlora.config.sections.base import Section

FIELD_LINE = re.compile(r"^    (\w+)\s*:")


@dataclass(frozen=True)
class KeyHelp:
    """One config key: its dotted name, type, default (YAML text) and help."""

    key: str
    type: str
    default: str
    help: str


def field_comments(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment block above it in ``cls``'s source (inherited fields: their class's)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, BaseModel)) or klass in (BaseModel, Section):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        block: list[str] = []
        for line in lines:
            stripped = line.strip()
            if line.startswith("    #"):
                block.append(stripped.lstrip("#").lstrip(":").strip())
                continue
            match = FIELD_LINE.match(line)
            if match and match.group(1) in klass.model_fields and block:
                out[match.group(1)] = " ".join(block)
            block = []
    return out


def docstring_help(cls: type[BaseModel]) -> dict[str, str]:
    """Field name -> what the section's docstring says of it: the sentence(s) after ``name``: up to the
    next ``other``: of a field (how the sections document several fields in one paragraph)."""
    doc = " ".join((inspect.getdoc(cls) or "").split())
    names = "|".join(re.escape(n) for n in cls.model_fields)
    if not names:
        return {}
    marks = list(re.finditer(rf"``({names})``(?: \([^)]*\))?:", doc))
    out: dict[str, str] = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=False):
        end = following.start() if following is not None else len(doc)
        text = doc[mark.end() : end].strip().rstrip(";,")
        out.setdefault(mark.group(1), text)
    return out


def section_help(cls: type[BaseModel]) -> str:
    """The first paragraph of a section's docstring, on one line."""
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    text = re.sub(r"<class '([\w.]+)'>", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return re.sub(r"\b[\w.]+\.(\w+Config|RankType|ModelVariant)\b", r"\1", text)


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def _section_fields(cls: type[BaseModel]) -> list[tuple[str, type[BaseModel] | None]]:
    fields: list[tuple[str, type[BaseModel] | None]] = []
    for name, info in cls.model_fields.items():
        annotation = info.annotation
        nested = annotation if isinstance(annotation, type) and issubclass(annotation, Section) else None
        fields.append((name, nested))
    return fields


def reference(cfg: ExperimentConfig | None = None) -> list[tuple[str, str, list[KeyHelp]]]:
    """(section, its help, its keys) in schema order; values from ``cfg`` (default: the schema's defaults).
    Top-level scalar keys (name, engine, plugins) come first, as section ``""``."""
    cfg = cfg or ExperimentConfig.model_validate({})
    tree = cfg.model_dump(mode="json")
    top_help = field_comments(ExperimentConfig)
    sections: list[tuple[str, str, list[KeyHelp]]] = [("", section_help(ExperimentConfig), [])]
    for name, nested in _section_fields(ExperimentConfig):
        value = tree[name]
        if nested is None:
            info = ExperimentConfig.model_fields[name]
            sections[0][2].append(
                KeyHelp(name, _type_name(info.annotation), _yaml_value(value), top_help.get(name, ""))
            )
            continue
        comments = {**docstring_help(nested), **field_comments(nested)}
        keys = [
            KeyHelp(
                f"{name}.{field}",
                _type_name(info.annotation),
                _yaml_value(value[field]),
                comments.get(field, ""),
            )
            for field, info in nested.model_fields.items()
        ]
        sections.append((name, section_help(nested), keys))
    return sections


def commented_yaml(cfg: ExperimentConfig | None = None) -> str:
    """The config as YAML, every key with its help as a comment above it (what ``fedlora config`` prints)."""
    out: list[str] = []
    for section, help_text, keys in reference(cfg):
        indent = "  " if section else ""
        if section:
            out += ["", *(f"# {line}" for line in textwrap.wrap(help_text, 100)), f"{section}:"]
        for key in keys:
            out += [f"{indent}# {line}" for line in textwrap.wrap(key.help, 100 - len(indent))]
            out.append(f"{indent}{key.key.rsplit('.', 1)[-1]}: {key.default}")
    return "\n".join(out).lstrip("\n") + "\n"


def markdown_reference() -> str:
    """``docs/config-reference.md``: one table per section (key, type, default, help)."""
    lines = [
        "# Config reference",
        "",
        "Generated from the schema by `fedlora config --markdown` (a test keeps it current): every key, its",
        "type, its default and its help. `fedlora config [CONFIG] [key=value ...]` prints a config with the same",
        "help as comments.",
    ]
    for section, help_text, keys in reference():
        lines += ["", f"## `{section}`" if section else "## top level", "", help_text, ""]
        lines += ["| key | type | default | help |", "|---|---|---|---|"]
        for key in keys:
            cells = [f"`{key.key}`", key.type, f"`{key.default}`", key.help]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"
