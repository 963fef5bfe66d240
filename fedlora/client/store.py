"""Personal client state on disk: tensors a client keeps between its rounds and never sends.

Any personalised method uses it: pFedLoRA's local-model weights, FedSA-LoRA's private B, per-client optimizer
state. Files are ``<folder>/client_<id>[.<name>].r<round>.safetensors``, written atomically (temporary file,
fsync, rename). A round reads the newest file from an EARLIER round and the two newest are kept, so a round
replayed after a crash starts from exactly what it started from the first time (resume stays bit-identical).
In simulation the folder is ``RUN_DIR/personal``; a Flower client keeps its own.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


class PersonalStore:
    """Versioned per-client tensors under one folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def _prefix(client_id: int, name: str) -> str:
        return f"client_{client_id}.{name}.r" if name else f"client_{client_id}.r"

    def _files(self, client_id: int, name: str) -> list[tuple[int, Path]]:
        if not self.folder.exists():
            return []
        found = []
        prefix = self._prefix(client_id, name)
        for path in self.folder.glob(f"{prefix}*.safetensors"):
            number = path.name[len(prefix) :].split(".", 1)[0]
            if number.isdigit():
                found.append((int(number), path))
        return sorted(found)

    def load(self, client_id: int, name: str, before_round: int) -> dict[str, torch.Tensor] | None:
        """The client's newest ``name`` tensors written in a round before ``before_round`` (None: none yet)."""
        earlier = [path for r, path in self._files(client_id, name) if r < before_round]
        return load_file(str(earlier[-1])) if earlier else None

    def save(self, client_id: int, name: str, server_round: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write the client's ``name`` tensors for ``server_round`` atomically; keep the two newest."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{self._prefix(client_id, name)}{server_round}.safetensors"
        tmp = final.with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        for _, old in self._files(client_id, name)[:-2]:
            old.unlink(missing_ok=True)
