"""Keep the claim experiments' records (configs, metrics, small JSON figures) in the repository; never their weights.

    python experiments/records.py save [runs] [experiments/records]
    python experiments/records.py restore [experiments/records] [runs]
    python experiments/records.py verify RUN [experiments/records]

``runs/`` is ignored by git and a fresh machine starts without it. ``save`` copies from every run folder under
``runs/`` what the tables read: ``config.yaml``, ``clients.json``, ``run.json``, ``metrics.jsonl``, the
benchmark accuracies ``eval/tasks.json`` (``fedlora eval --tasks``) and ``eval/eval.json`` (``fedlora eval``; a
finished record gains them later) and the
base-model evaluations (``base-model_seed-*.json``) and the scripts' notes beside the runs (``*.txt``: a tuned
rate, a gate's lines), and writes ``weights.json``: a manifest of the weights the
run holds (the final adapter ``global/`` of a finished run, else its newest checkpoint), each file with its size
and SHA-256, and the command that regenerates them. Adapters and checkpoints never enter git (``.gitignore``
refuses ``*.safetensors`` under ``experiments/records/``).

``restore`` brings back every finished record whose run is missing under ``runs/``: its files and, in place of
the weights, ``global/weights.json`` (so the experiment scripts and ``fedlora sweep`` see a finished run and
skip it; ``fedlora eval`` on it says the adapter is not there). An unfinished record is not restored: with no
checkpoint kept, the script runs it again from round 1. ``verify`` compares a regenerated run's weights with
its record's checksums (equal bit for bit on the same kind of machine; BLAS kernels differ between machines).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from fedlora.engine.checkpoint import list_rounds, sha256_file

RECORD_FILES = (
    "config.yaml",
    "clients.json",
    "run.json",
    "metrics.jsonl",
    "eval/tasks.json",
    "eval/eval.json",
)
MANIFEST = "weights.json"


def run_folders(root: Path) -> list[Path]:
    """Every run folder under ``root`` (one with a ``config.yaml`` and a ``run.json``)."""
    return sorted(p.parent for p in root.rglob("run.json") if (p.parent / "config.yaml").exists())


def rounds_logged(run: Path) -> int:
    """Rounds in the run's ``metrics.jsonl`` (0 without one)."""
    metrics = run / "metrics.jsonl"
    return sum(1 for line in metrics.read_text().splitlines() if line.strip()) if metrics.exists() else 0


def newest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint folder (``checkpoints/round_N`` with its state file), if any."""
    rounds = list_rounds(run / "checkpoints")
    return run / "checkpoints" / f"round_{rounds[-1]}" if rounds else None


def is_finished(run: Path) -> bool:
    """A run whose final adapter folder ``global/`` was written (last, atomically)."""
    return (run / "global").is_dir()


def weights_manifest(run: Path, relative: Path) -> dict[str, Any]:
    """What weights ``run`` holds (``global/`` when finished, else the newest checkpoint), each file with its
    size and SHA-256, and the command that regenerates them from the record (``relative``: its path under
    ``runs/``)."""
    finished = is_finished(run)
    folder = run / "global" if finished else newest_checkpoint(run)
    files = []
    if folder is not None and not (folder / MANIFEST).exists():
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            files.append(
                {
                    "path": str(path.relative_to(run)),
                    "bytes": path.stat().st_size,
                    "sha256": sha256_file(path),
                }
            )
    elif folder is not None:  # a restored record: its manifest stands for the weights
        return json.loads((folder / MANIFEST).read_text())
    return {
        "finished": finished,
        "rounds": rounds_logged(run),
        "files": files,
        "regenerate": f"fedlora run experiments/records/{relative}/config.yaml --output runs/{relative}",
    }


def write_json(path: Path, value: Any) -> None:
    """``value`` as JSON at ``path``, written aside then renamed (whole or old)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=1) + "\n")
    partial.replace(path)


def save_run(run: Path, record: Path, relative: Path) -> None:
    """Copy one run folder's records and its weights manifest into ``record``, built aside then swapped in."""
    staged = record.with_name(record.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for name in RECORD_FILES:
        if (run / name).exists():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / name, staged / name)
    write_json(staged / MANIFEST, weights_manifest(run, relative))
    shutil.rmtree(record, ignore_errors=True)
    staged.rename(record)


def recorded(record: Path) -> dict[str, Any]:
    """The record's manifest (empty without one)."""
    path = record / MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def copy_notes(source: Path, destination: Path) -> list[Path]:
    """Copy the experiment's own small files outside the run folders that ``destination`` lacks or holds
    otherwise: the base-model evaluations (``base-model_seed-*.json``) and the scripts' notes (``*.txt``: a
    tuned rate, a gate's verdict, where a cell came from)."""
    inside_runs = set(run_folders(source))
    copied = []
    for note in sorted([*source.rglob("base-model_seed-*.json"), *source.rglob("*.txt")]):
        if any(parent in inside_runs for parent in note.parents):
            continue
        target = destination / note.relative_to(source)
        if not target.exists() or target.read_bytes() != note.read_bytes():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(note, target)
            copied.append(target)
    return copied


def save(runs: Path, records: Path) -> list[str]:
    """Save every run under ``runs`` whose record is missing or older; returns one line per saved run."""
    done = []
    for run in run_folders(runs):
        relative = run.relative_to(runs)
        record = records / relative
        kept = recorded(record)
        evaluated_since = any((run / n).exists() and not (record / n).exists() for n in RECORD_FILES)
        if (kept.get("finished") and not evaluated_since) or (
            not is_finished(run) and kept and kept.get("rounds", 0) >= rounds_logged(run)
        ):
            continue
        save_run(run, record, relative)
        done.append(f"saved {run}: {rounds_logged(run)} rounds{', finished' if is_finished(run) else ''}")
    return done + [f"saved {target}" for target in copy_notes(runs, records)]


def restore(records: Path, runs: Path) -> list[str]:
    """Bring back every finished record whose run is missing under ``runs`` (see the module docstring)."""
    done = []
    for record in run_folders(records):
        run = runs / record.relative_to(records)
        if run.exists():
            continue
        manifest = recorded(record)
        if not manifest.get("finished"):
            done.append(
                f"not restored {run}: unfinished, and no checkpoint is kept; it runs again from round 1"
            )
            continue
        partial = run.with_name(run.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(record, partial)
        (partial / "global").mkdir()
        shutil.copy2(record / MANIFEST, partial / "global" / MANIFEST)
        partial.rename(run)
        done.append(
            f"restored {run}: {rounds_logged(record)} rounds (weights not kept: {manifest['regenerate']})"
        )
    return done + [f"restored {target}" for target in copy_notes(records, runs)]


def verify(run: Path, record: Path) -> list[str]:
    """The files of the record's manifest that ``run`` lacks or holds with another checksum (empty: all equal)."""
    wrong = []
    for entry in recorded(record).get("files", []):
        path = run / entry["path"]
        if not path.exists():
            wrong.append(f"{path}: missing")
        elif sha256_file(path) != entry["sha256"]:
            wrong.append(f"{path}: sha256 differs from the record's")
    return wrong


def main(argv: list[str]) -> int:
    usage = (
        "usage: records.py save [runs] [experiments/records] | restore [experiments/records] [runs] | "
        "verify RUN [RECORD]"
    )
    if not argv or argv[0] not in ("save", "restore", "verify"):
        print(usage)
        return 2
    if argv[0] == "verify":
        if len(argv) < 2:
            print(usage)
            return 2
        run = Path(argv[1])
        record = Path(argv[2]) if len(argv) > 2 else Path("experiments/records") / run.relative_to("runs")
        wrong = verify(run, record)
        print("\n".join(wrong) or f"{run}: every file matches {record / MANIFEST}")
        return 1 if wrong else 0
    if argv[0] == "save":
        lines = save(
            Path(argv[1] if len(argv) > 1 else "runs"),
            Path(argv[2] if len(argv) > 2 else "experiments/records"),
        )
    else:
        lines = restore(
            Path(argv[1] if len(argv) > 1 else "experiments/records"),
            Path(argv[2] if len(argv) > 2 else "runs"),
        )
    print("\n".join(lines) or "nothing to do")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
