"""Hugging Face ``datasets`` as a data source (``data.source: hf``), offline.

``data.path`` may be:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``;
  a DatasetDict's split is ``data.hf_split``);
- a ``.parquet``, ``.csv``, ``.json`` / ``.jsonl`` or ``.arrow`` file (``datasets``' own readers);
- a hub dataset id (``organisation/name``) already in the local Hugging Face cache (read with the hub offline).

Rows are then read like any dataset given in Python (:func:`fedlora.data.federation.rows_source`): the
``data.*_field`` names, or ``data.messages_field`` for a chat column (:func:`messages_to_record`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.data.errors import DataError

FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def load_rows(path_or_id: str, split: str) -> tuple[Any, str]:
    """The rows (a ``datasets.Dataset``) and a description of where they came from."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(path_or_id).expanduser()
    try:
        if path.is_dir():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise DataError(
                        path, f"no split {split!r} (splits: {', '.join(loaded)}); set data.hf_split"
                    )
                loaded = loaded[split]
            return loaded, f"{path} (save_to_disk)"
        if path.is_file():
            if path.suffix == ".arrow":
                return datasets.Dataset.from_file(str(path)), str(path)
            builder = FILE_BUILDERS.get(path.suffix)
            if builder is None:
                raise DataError(path, f"not a file datasets reads ({', '.join([*FILE_BUILDERS, '.arrow'])})")
            return datasets.load_dataset(builder, data_files=str(path), split="train"), str(path)
    except DataError:
        raise
    except Exception as err:  # pyarrow / datasets errors on a damaged or mistyped file
        raise DataError(path, f"cannot be read by datasets: {type(err).__name__}: {err}") from None
    if path.exists() or "/" not in path_or_id or path_or_id.startswith((".", "/", "~")):
        raise DataError(path, "file or folder not found")
    return _hub_dataset(path_or_id, split), f"{path_or_id} (Hugging Face cache)"


def _hub_dataset(repo_id: str, split: str) -> Any:
    import datasets
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        datasets.config.HF_HUB_OFFLINE = True
        return datasets.load_dataset(repo_id, split=split)
    except Exception as err:
        raise DataError(
            repo_id,
            f"not in the local Hugging Face cache ({HF_HUB_CACHE}) or not readable offline ({type(err).__name__}): "
            f"on a machine with network load it once (datasets.load_dataset({repo_id!r})) and copy the cache here, "
            "or save it with save_to_disk and give that folder",
        ) from None


def messages_to_record(row: dict[str, Any], data: Any, number: int) -> dict[str, Any]:
    """A chat row (``data.messages_field``: a list of ``{"role", "content"}``) as instruction / input / output:
    the last assistant message is the output, the user message before it the instruction, and any earlier
    turns (system prompt, previous exchanges) the input, one ``role: content`` line each. The category field,
    if any, is kept."""
    messages = row.get(data.messages_field)
    where = f"dataset row {number}"
    if not isinstance(messages, list) or not messages:
        raise DataError(where, f"field {data.messages_field!r} must be a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(where, f"field {data.messages_field!r}: every message needs 'role' and 'content'")
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0 or messages[last - 1]["role"] != "user":
        raise DataError(
            where, "the conversation must end with a user message answered by an assistant message"
        )
    earlier = "\n".join(f"{m['role']}: {m['content']}" for m in messages[: last - 1])
    record = {
        data.instruction_field: str(messages[last - 1]["content"]),
        data.input_field: earlier,
        data.output_field: str(messages[last]["content"]),
    }
    if data.category_field and data.category_field in row:
        record[data.category_field] = row[data.category_field]
    return record
