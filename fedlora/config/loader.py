"""Reading an experiment config: YAML file + dotted ``key=value`` overrides -> validated config.

Errors never reach the user as a pydantic dump: :class:`ConfigError` names the dotted field, the value
given and what is allowed, and is raised before any model or data is touched.
"""

from __future__ import annotations

import contextlib
import re
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fedlora.config.schema import ExperimentConfig
from fedlora.errors import ConfigError


def builtin_config_path(name: str = "default") -> Path:
    """Path of a config shipped inside the package (``fedlora/config/builtin/<name>.yaml``)."""
    path = Path(__file__).resolve().parent / "builtin" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"no built-in config named {name!r}")
    return path


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"adapter.rank=4"`` -> (["adapter", "rank"], 4). The value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} is not of the form key.path=value")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {shown(text)} has an empty key")
    try:
        if "\0" in raw:
            raise ConfigError(f"override {'.'.join(parts)!r}: a NUL byte in the value; remove it")
        _check_shape(raw, f"override {'.'.join(parts)!r}")
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(
            f"override {'.'.join(parts)!r}: value is not valid YAML ({shown_error(err)})"
        ) from None
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as text; users mean a number
        with contextlib.suppress(ValueError):
            value = float(value) if any(c.isdigit() for c in value) and value.strip() == value else value
    return parts, value


def set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """``tree[parts[0]][parts[1]]... = value`` in the nested dict ``tree``, making missing sections."""
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override in the nested dict ``tree`` (in place) and return it."""
    for text in overrides:
        set_path(tree, *parse_override(text))
    return tree


def _allowed(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """Describe what the field at ``loc`` accepts: its Literal choices, or the section's known keys."""
    current: Any = model
    for i, part in enumerate(loc):
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        fields = current.model_fields
        if part not in fields:
            if i == len(loc) - 1:
                return "known keys: " + ", ".join(sorted(fields))
            return None
        current = _unwrap(fields[part].annotation)
    choices = _literal_choices(current)
    return "allowed: " + ", ".join(repr(c) for c in choices) if choices else None


def _unwrap(annotation: Any) -> Any:
    """The BaseModel inside Optional[...] etc., or the annotation itself."""
    for arg in typing.get_args(annotation) or ():
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return annotation


def _literal_choices(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    choices: list[Any] = []
    for arg in typing.get_args(annotation) or ():
        choices += _literal_choices(arg)
    return choices


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: ``field 'a.b': <problem> (got <value>; allowed: ...)``."""
    lines = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        dotted = ".".join(str(p) for p in loc) or "<root>"
        given = problem.get("input")
        msg = problem["msg"]
        if problem["type"] == "extra_forbidden":
            msg = "unknown key"
        if problem["type"] == "string_pattern_mismatch" and loc and loc[0] == "plugins":
            msg = "not an importable module name (letters, digits, _ and dots: my_package.my_methods)"
        detail = f"got {shown(given)}" if loc and problem["type"] != "model_type" else ""
        allowed = _allowed(ExperimentConfig, tuple(str(p) for p in loc if not isinstance(p, int)))
        extra = "; ".join(x for x in (detail, allowed) if x)
        lines.append(f"config field '{dotted}': {msg}" + (f" ({extra})" if extra else ""))
    return "invalid config:\n  " + "\n  ".join(lines)


def schema_config(tree: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict against the schema, raising ConfigError (registry names are checked by
    :func:`fedlora.preflight.check_experiment`)."""
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"{self.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice in one section "
                    f"(first at line {seen[key] + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


#: a config file larger than this is refused unread (configs are a few KB)
MAX_CONFIG_BYTES = 1 << 20
#: deepest nesting of sections and lists a config may have (the schema needs 4)
MAX_CONFIG_DEPTH = 64
#: the most values a config may hold once its YAML aliases are expanded (an alias "bomb" expands to billions)
MAX_CONFIG_VALUES = 100_000
#: the most characters of a value an error message repeats
SHOWN_CHARS = 200


def shown(value: Any) -> str:
    """``repr(value)`` cut to :data:`SHOWN_CHARS` characters (an error never echoes a 5 MB value)."""
    text = repr(value)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def _check_shape(text: str, name: str) -> None:
    """Refuse, before any YAML object is built, what would exhaust the machine: nesting deeper than
    :data:`MAX_CONFIG_DEPTH` (PyYAML's composer recurses) and aliases that expand past
    :data:`MAX_CONFIG_VALUES` values. Reads the event stream (no recursion), counting each anchored value's
    expanded size once."""
    stack: list[list[Any]] = [[None, 0]]  # [anchor, values] per open collection, the document first
    sizes: dict[str, int] = {}
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if len(stack) > MAX_CONFIG_DEPTH:
                raise ConfigError(
                    f"{name}:{event.start_mark.line + 1}: nested more than {MAX_CONFIG_DEPTH} levels deep; "
                    "a config is a few sections of settings"
                )
            stack.append([event.anchor, 0])
            continue
        if isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = stack.pop()
            size += 1
            if anchor is not None:
                sizes[anchor] = size
        elif isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor, 1)
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        else:
            continue
        stack[-1][1] += size
        if stack[-1][1] > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{name}:{event.start_mark.line + 1}: its YAML aliases expand to more than {MAX_CONFIG_VALUES:,} "
                "values; write the settings out instead of nesting aliases"
            )


def read_yaml(path: Path) -> Any:
    """A YAML file's content, with readable errors (not a file, too large, not UTF-8, a NUL byte, bad YAML,
    too deep or alias-expanding, duplicate keys)."""
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a config file is at most {MAX_CONFIG_BYTES:,} bytes")
    data = path.read_bytes()
    if b"\0" in data:
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: a NUL byte; a config is text (remove it)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text") from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)
    try:
        _check_shape(text, str(path))
        return loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {shown_error(err)}") from None
    finally:
        loader.dispose()


def shown_error(err: yaml.YAMLError) -> str:
    """A YAML error on one line: its problem and where (PyYAML quotes the offending lines, at any length)."""
    if isinstance(err, yaml.MarkedYAMLError):
        where = f" (line {err.problem_mark.line + 1})" if err.problem_mark else ""
        return f"{err.problem or err.context}{where}"
    return str(err)[:SHOWN_CHARS]


#: (section, key) of the fields that name files or folders
PATH_FIELDS = (("data", "path"), ("model", "cache_dir"), ("output", "dir"), ("output", "root"))


#: a Hugging Face hub model id: "organisation/name"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_path(name: str) -> bool:
    return "/" in name or name.startswith((".", "~")) or name.endswith(".gguf")


def resolve_paths(tree: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make the tree's relative paths absolute against ``base`` (in place): ``data.path``,
    ``model.cache_dir``, ``output.dir`` / ``output.root``, and ``model.name`` when it is a file or folder."""
    for section, key in PATH_FIELDS:
        node = tree.get(section)
        if isinstance(node, dict) and isinstance(node.get(key), str) and node[key]:
            value = Path(node[key]).expanduser()
            node[key] = str(value if value.is_absolute() else (base / value).resolve())
    model = tree.get("model")
    if isinstance(model, dict) and isinstance(model.get("name"), str) and _looks_like_path(model["name"]):
        value = Path(model["name"]).expanduser()
        if not value.is_absolute():
            local = (base / value).resolve()
            # "org/name" with no such folder here is a Hugging Face hub id (resolved from the local cache)
            if local.exists() or not HUB_ID.fullmatch(model["name"]):
                model["name"] = str(local)
    return tree


def read_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path``, apply dotted overrides, validate against the schema (no registry checks: that is
    :func:`fedlora.preflight.load_config`, which calls this). The one rule of ``run``, ``sweep``, ``flower`` and
    ``fedlora.load_config``: overrides apply to the file given; with no file, to the schema's defaults
    (:func:`schema_config_from_overrides`); with neither, the built-in demo experiment (``builtin/default.yaml``).

    Relative paths in the file are read against the file's folder, those in overrides against the current
    directory; both are stored absolute, so the run's ``config.yaml`` works from anywhere."""
    if path is None and overrides:
        return schema_config_from_overrides(overrides)
    builtin = path is None
    path = Path(path) if path is not None else builtin_config_path("default")
    tree = read_yaml(path) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    resolve_paths(tree, Path.cwd() if builtin else path.resolve().parent)
    apply_overrides(tree, overrides or [])
    return schema_config(resolve_paths(tree, Path.cwd()))


def schema_config_from_overrides(overrides: list[str]) -> ExperimentConfig:
    """A config from command-line overrides alone: the schema's defaults (not the built-in demo experiment,
    whose caps and data would silently apply), named ``<strategy>-<data source>`` unless ``name`` is given."""
    tree: dict[str, Any] = {}
    apply_overrides(tree, overrides)
    resolve_paths(tree, Path.cwd())
    cfg = schema_config(tree)
    if "name" not in tree:  # validated on assignment
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{cfg.strategy.name}-{cfg.data.source}").strip("-.")
        cfg.name = name or "experiment"
    return cfg


def config_text(cfg: ExperimentConfig) -> str:
    """The full resolved config (every default filled in) as YAML text."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def dump_config(cfg: ExperimentConfig, path: Path) -> None:
    """Write :func:`config_text` to ``path``."""
    path.write_text(config_text(cfg))
