"""Round checkpoints: ``run_dir/checkpoints/round_<N>/`` with the server state (safetensors) and
``state.json`` (round, SHA-256 of the tensors file). Written into a temporary folder, fsynced, then renamed,
so a checkpoint folder either is complete or does not exist; a damaged one fails its checksum and the
previous one is used. ``state.json`` carries the SHA-256 of its own content (``meta_sha256``): a checkpoint
without it, or whose round disagrees with its folder, is refused. A full disk while writing leaves no partial
folder and stops with one line (:class:`DiskFull`) naming the file and the space it needed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedlora.errors import RunFailed
from fedlora.tracking.report import human_bytes

log = logging.getLogger(__name__)

TENSORS = "server_state.safetensors"
META = "state.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that fails its checksum."""


class DiskFull(RunFailed):
    """The disk (or the quota) ran out while writing a record; nothing partial was left behind."""


#: errnos that mean "no room for this file": a full disk, a quota, a file-size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def is_no_space(err: BaseException) -> bool:
    """Whether ``err`` (an OSError, or safetensors' SafetensorError that carries the OS error only in its
    text, ``... Os { code: 28, ... }``) means the file did not fit."""
    if isinstance(err, OSError):
        return err.errno in NO_SPACE
    text = str(err)
    return any(f"code: {code}," in text or f"os error {code})" in text for code in NO_SPACE)


def disk_full(path: Path, needed: int, then: str = "try again") -> DiskFull:
    """The one-line error for a record of ``needed`` bytes that did not fit at ``path``."""
    room = ""
    with contextlib.suppress(OSError):
        room = f", {human_bytes(shutil.disk_usage(next(p for p in path.parents if p.exists())).free)} free"
    return DiskFull(
        f"no space left on the device writing {path} (it needs about {human_bytes(needed)}{room}): free some "
        f"space, then {then}"
    )


@dataclass
class Checkpoint:
    round: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of the metadata itself (round, tensor checksum, ledger...), so none of it can be edited."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (so a rename in it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    root: Path, server_round: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2
) -> Path:
    """Write round ``server_round`` atomically and keep only the newest ``keep`` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round_{server_round}"
    tmp = root / f".round_{server_round}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        tmp.mkdir()
        save_file(cpu, str(tmp / TENSORS))
        record = {**meta, "round": server_round, "sha256": sha256_file(tmp / TENSORS)}
        record["meta_sha256"] = _meta_digest(record)
        (tmp / META).write_text(json.dumps(record, indent=1))
        for name in (TENSORS, META):
            fsync_path(tmp / name)
    except (OSError, SafetensorError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(err):
            needed = sum(v.numel() * v.element_size() for v in cpu.values())
            then = f"`fedlora run --resume {root.parent}` (the rounds before stand)"
            raise disk_full(final / TENSORS, needed, then) from None
        raise
    if final.exists():  # a damaged checkpoint of this round from an earlier attempt: move it aside atomically
        _discard(root, final)
    os.replace(tmp, final)
    fsync_path(root)
    for old in sorted(list_rounds(root))[:-keep]:
        _discard(root, root / f"round_{old}")
    for leftover in root.glob(".trash_*"):  # from a process killed while deleting
        shutil.rmtree(leftover, ignore_errors=True)
    return final


def _discard(root: Path, folder: Path) -> None:
    """Rename first (atomic: the checkpoint disappears whole), then delete, so that a kill at any moment
    never leaves a half-deleted checkpoint that looks like a real one."""
    trash = root / f".trash_{folder.name}_{os.getpid()}"
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def list_rounds(root: Path) -> list[int]:
    if not root.exists():
        return []
    rounds = []
    for path in root.glob("round_*"):
        suffix = path.name.removeprefix("round_")
        if suffix.isdigit() and (path / META).exists():
            rounds.append(int(suffix))
    return sorted(rounds)


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read one checkpoint, refusing it if its tensors do not match the recorded checksum."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder}: unreadable {META} ({err})") from None
    if not isinstance(meta, dict) or meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{folder}: {META} fails its SHA-256 check or has none (edited or damaged)")
    if folder.name != f"round_{meta.get('round')}":
        raise CheckpointError(f"{folder}: {META} says round {meta.get('round')}, the folder another")
    tensors_path = folder / TENSORS
    if not tensors_path.exists() or sha256_file(tensors_path) != meta.get("sha256"):
        raise CheckpointError(f"{folder}: {TENSORS} is missing or fails its SHA-256 check")
    return Checkpoint(round=int(meta["round"]), tensors=load_file(str(tensors_path)), meta=meta)


def latest_checkpoint(root: Path, must_exist: bool = False) -> Checkpoint | None:
    """The newest checkpoint that passes its checksum (older ones are tried if the newest is damaged).

    ``must_exist``: when checkpoints were written but none is usable, raise instead of returning None (a
    resume must not silently start again from round 1)."""
    rounds = list_rounds(root)
    for server_round in reversed(rounds):
        try:
            return load_checkpoint(root / f"round_{server_round}")
        except CheckpointError as err:
            log.warning("skipping damaged checkpoint: %s", err)
    if must_exist and rounds:
        raise CheckpointError(
            f"every checkpoint in {root} is damaged (rounds {rounds}): the run cannot resume exactly; "
            "start a new run"
        )
    return None
