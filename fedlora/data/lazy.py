"""Per-client data on disk, read only when a client is used: memory does not grow with the federation.

The Natural Instructions file (gzip JSON Lines, one client per line) is expanded once into an uncompressed
copy in the cache (``$FEDLORA_CACHE/data/<file>-<size>-<mtime>/``) together with ``index.json``: each client's
byte offset and length in the copy, its id, task, category and split sizes. A :class:`LazyClientData`
holds only that entry; its ``train`` / ``eval`` / ``test`` lists are parsed from its one line on each access
(one seek and one ``json.loads``), so only the sampled clients are ever materialised, and tokenisation
happens in the round that uses them. Malformed lines are found while the index is built (file and line).
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.errors import DataError
from fedlora.data.examples import Example

INDEX = "index.json"
CLIENTS = "clients.jsonl"


def _cache_root() -> Path:
    root = os.environ.get("FEDLORA_CACHE") or Path.home() / ".cache" / "fedlora"
    return Path(root).expanduser() / "data"


def index_folder(path: Path) -> Path:
    """The cache folder holding ``path``'s uncompressed copy and index (built on first use)."""
    stat = path.stat()
    folder = _cache_root() / f"{path.name}-{stat.st_size}-{stat.st_mtime_ns}"
    if not (folder / INDEX).exists():
        build_index(path, folder)
    return folder


def build_index(path: Path, folder: Path) -> None:
    """Stream ``path`` once: write each client line to the copy and record where it is (atomic rename; each
    process writes its own temporary files, so processes that build the same index at once do not collide)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp_lines, tmp_index = (folder / f".{name}.{os.getpid()}.tmp" for name in (CLIENTS, INDEX))
    entries: list[dict[str, Any]] = []
    opener = gzip.open if path.name.endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as src, open(tmp_lines, "wb") as dst:
        for number, raw in enumerate(src, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                entry = {
                    "client_id": int(record["client_id"]),
                    "task": str(record.get("task", record["client_id"])),
                    "category": str(record.get("category", "")),
                    "sizes": {s: len(record.get(s, [])) for s in ("train", "eval", "test")},
                }
                str(record["instruction"])
            except json.JSONDecodeError as err:
                raise DataError(path, f"malformed JSON ({err.msg} at column {err.colno})", number) from None
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise DataError(path, f"not a Natural Instructions client record ({err!r})", number) from None
            line = raw if raw.endswith(b"\n") else raw + b"\n"
            dst.write(line)
            entry.update(offset=offset, length=len(line), line=number)
            offset += len(line)
            entries.append(entry)
    tmp_index.write_text(json.dumps({"source": str(path), "clients": entries}))
    os.replace(tmp_lines, folder / CLIENTS)
    os.replace(tmp_index, folder / INDEX)


@dataclass(frozen=True)
class LazyClientData:
    """A client whose examples stay on disk until asked for (same interface as ClientData)."""

    client_id: int
    name: str
    file: Path
    offset: int
    length: int
    sizes: dict[str, int]
    max_train: int | None = None
    max_eval: int | None = None

    def _load(self, split: str) -> list[Example]:
        with open(self.file, "rb") as handle:
            handle.seek(self.offset)
            record = json.loads(handle.read(self.length))
        instruction, category = str(record["instruction"]), str(record.get("category", ""))
        cap = self.max_train if split == "train" else self.max_eval
        items = record.get(split, [])[:cap] if cap else record.get(split, [])
        return [
            Example(
                instruction=instruction, input=str(x["input"]), output=str(x["output"]), category=category
            )
            for x in items
        ]

    @property
    def train(self) -> list[Example]:
        return self._load("train")

    @property
    def eval(self) -> list[Example]:
        return self._load("eval")

    @property
    def test(self) -> list[Example]:
        return self._load("test")

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "eval", "test"):
            raise ValueError(f"unknown split {name!r}; allowed: train, eval, test")
        return self._load(name)

    def size(self, split: str) -> int:
        cap = self.max_train if split == "train" else self.max_eval
        return min(self.sizes[split], cap) if cap else self.sizes[split]

    def with_id(self, client_id: int) -> LazyClientData:
        return LazyClientData(**{**self.__dict__, "client_id": client_id})

    def capped(self, max_train: int | None, max_eval: int | None) -> LazyClientData:
        return LazyClientData(**{**self.__dict__, "max_train": max_train, "max_eval": max_eval})


def lazy_natural_instructions(path: Path, max_clients: int | None = None) -> list[LazyClientData]:
    """The per-task federation as lazy clients (the first ``max_clients`` lines, all if None)."""
    folder = index_folder(path)
    entries = json.loads((folder / INDEX).read_text())["clients"]
    if max_clients is not None:
        entries = entries[:max_clients]
    return [
        LazyClientData(e["client_id"], e["task"], folder / CLIENTS, e["offset"], e["length"], e["sizes"])
        for e in entries
    ]
