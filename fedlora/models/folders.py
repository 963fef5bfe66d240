"""Writing model folders into the cache so that a folder is either complete or absent."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a sibling ``<target>.partial`` path to fill; on success it replaces ``target`` by a rename."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    yield partial
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def save_model_folder(target: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as a Hugging Face folder at ``target``, atomically."""
    with atomic_folder(target) as partial:
        partial.mkdir()
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    return target
