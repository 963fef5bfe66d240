"""The run folder's integrity: one process at a time, records written atomically, a resume that cannot
change what was trained.

- **Lock**: ``RUN_DIR/.lock``, an exclusive ``fcntl.flock`` held for the life of the process (the kernel
  releases it when the process dies, even on SIGKILL); a second run or resume of the same folder stops with
  the other process's PID.
- **Atomic records**: every record is written to a temporary file, fsynced, then renamed over the old one,
  so a crash or a full disk leaves the previous version or the new one, never a truncated file.
- **Config checksum**: ``run.json`` keeps the SHA-256 of ``config.yaml`` and of every version a resume
  wrote; every checkpoint carries the one it was made with. A damaged or edited ``config.yaml`` is refused
  instead of being read as defaults.
- **Resume**: the config a resume asks for is compared with the run's own; changes to anything that was or
  will be trained are refused, listing the fields; only ``SAFE_ON_RESUME`` may change (recorded in
  ``run.json`` with the round they took effect). ``config.yaml`` is then the effective config (what a later
  resume, ``eval``, ``compare`` and a rerun read); the first one is kept as ``config.original.yaml``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fedlora.config.schema import ExperimentConfig
from fedlora.engine.checkpoint import fsync_path
from fedlora.errors import ConfigError

#: dotted prefixes a resume may change: more (or fewer, not below the done) rounds, evaluation, output,
#: the run's name and how it is run (threads, engine): none of them changes what the clients train
SAFE_ON_RESUME = ("federation.rounds", "eval.", "output.", "name", "engine", "client.num_threads", "compute.")

LOCK_NAME = ".lock"
#: the config a run started with, kept when a resume rewrites ``config.yaml``
ORIGINAL_CONFIG = "config.original.yaml"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its previous content, whatever happens (temporary file, fsync, rename)."""
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """:func:`atomic_write_bytes` of the concatenated ``chunks``, written as they come (a record too large
    to hold twice in memory, such as 100,000 clients' entries, is never built whole)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def default_file_mode() -> int:
    """The mode a new file gets here (0o666 less the process's umask: 0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def replace_folder(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final`` (an older ``final`` is moved aside first, then deleted).
    Its files get the normal mode (writers that go through a private temporary file leave 0600)."""
    mode = default_file_mode()
    for child in tmp.iterdir():
        if child.is_file():
            os.chmod(child, mode)
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_path(tmp)
    if final.exists():
        trash = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(final.parent)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock for the duration (released by the kernel if the process dies)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    handle = open(path, "a+")  # noqa: SIM115  (held open for the lock's life)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            handle.seek(0)
            other = handle.read().strip() or "another process"
            raise ConfigError(
                f"{run_dir} is in use by {other}: wait for it to finish or stop it (one run per folder)"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        yield
    finally:
        handle.close()


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def config_changes(before: ExperimentConfig, after: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted field -> (before, after) for every field that differs."""
    a, b = flat(before.model_dump(mode="json")), flat(after.model_dump(mode="json"))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def check_resume(stored: ExperimentConfig, given: ExperimentConfig, done_rounds: int) -> dict[str, Any]:
    """The safe changes a resume makes (to record), or ConfigError listing the refused ones."""
    changes = config_changes(stored, given)
    refused = [k for k in changes if not any(k == p.rstrip(".") or k.startswith(p) for p in SAFE_ON_RESUME)]
    if refused:
        shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused[:6])
        raise ConfigError(
            f"a resume cannot change what was trained: {shown}"
            + (f" and {len(refused) - 6} more" if len(refused) > 6 else "")
            + f". Only {', '.join(SAFE_ON_RESUME)} may change; start a new run for anything else"
        )
    if given.federation.rounds < done_rounds:
        raise ConfigError(
            f"config field 'federation.rounds': {given.federation.rounds} is below the {done_rounds} rounds "
            "this run has already done"
        )
    return {k: v[1] for k, v in changes.items()}


def read_run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is damaged ({err}); the run cannot be trusted to resume") from None


def known_config_sha256(info: dict[str, Any]) -> set[str]:
    """The checksums of every ``config.yaml`` the run has had (``run.json``: the first, each resume's)."""
    shas = {info.get("config_sha256"), info.get("original_config_sha256")}
    shas |= {r.get("config_sha256") for r in info.get("resumes", [])}
    return {s for s in shas if s}


def write_effective_config(run_dir: Path, text: str) -> None:
    """``config.yaml`` becomes ``text`` (the config after a resume's changes); the run's first config is
    kept as :data:`ORIGINAL_CONFIG`. ``run.json`` must already list ``text``'s checksum (a crash between
    the two writes leaves a config the run knows)."""
    original = run_dir / ORIGINAL_CONFIG
    if not original.exists():
        atomic_write_bytes(original, (run_dir / "config.yaml").read_bytes())
    atomic_write_text(run_dir / "config.yaml", text)


def verified_config_text(run_dir: Path) -> str:
    """``config.yaml`` (as the run started, or as its last resume wrote it), or ConfigError if it is
    missing, empty or changed by hand."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    data = path.read_bytes()
    known = known_config_sha256(read_run_info(run_dir))
    if not data.strip():
        raise ConfigError(f"{path} is empty (damaged): the run's settings are lost; it cannot resume")
    if known and sha256_bytes(data) not in known:
        raise ConfigError(
            f"{path} does not match the checksum recorded when the run started (damaged or edited by hand); "
            "restore it, or start a new run with the settings you want"
        )
    return data.decode("utf-8")
