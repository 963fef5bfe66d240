"""Hugging Face ``datasets`` as a data source (``data.source: hf``), offline.

``data.path`` may be:

- a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``datasets.load_from_disk``;
  a DatasetDict's split is ``data.hf_split``);
- a ``.parquet``, ``.csv``, ``.json`` / ``.jsonl`` or ``.arrow`` file (``datasets``' own readers);
- a hub dataset id (``organisation/name``) already in the local Hugging Face cache (read with the hub offline).

Rows are then read like any dataset given in Python (:func:`fedlora.data.federation.rows_source`): the
``data.*_field`` names, or ``data.messages_field`` for a chat column (:mod:`fedlora.data.chat`).
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
    if path.exists() or path_or_id.startswith((".", "/", "~")) or path.suffix in (*FILE_BUILDERS, ".arrow"):
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
            f"no such file or folder here, and no such dataset in the local Hugging Face cache ({HF_HUB_CACHE}) or not readable offline ({type(err).__name__}): "
            f"on a machine with network load it once (datasets.load_dataset({repo_id!r})) and copy the cache here, "
            "or save it with save_to_disk and give that folder",
        ) from None
