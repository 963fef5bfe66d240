"""Keep the claim experiments' runs in the repository, so that they survive the machine they ran on.

    python experiments/records.py save [runs] [experiments/records]
    python experiments/records.py restore [experiments/records] [runs]

``runs/`` is ignored by git and a fresh machine starts without it, while a 30-round run here takes hours and a
grid takes several sessions. ``save`` copies what the tables and a resume need from every run folder under
``runs/`` into ``experiments/records/`` (tracked): ``config.yaml``, ``clients.json``, ``run.json`` and
``metrics.jsonl``; the final adapter ``global/`` of a finished run, or the newest checkpoint
``checkpoints/round_N/`` of an unfinished one (so that ``fedlora run --resume`` continues it exactly on another
machine); and the base-model evaluations (``base-model_seed-*.json``). Logs, plots and older checkpoints are
left out. ``restore`` copies the records back into ``runs/`` for every run that is missing there or has fewer
logged rounds than its record, so that the experiment scripts skip what has finished and resume the rest.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from fedlora.engine.checkpoint import list_rounds

RECORD_FILES = ("config.yaml", "clients.json", "run.json", "metrics.jsonl")
# a folder larger than this (a whole-model FedAvg's global model, say) is not put in the repository
MAX_KEPT_MB = 20.0


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


def replace_tree(source: Path, target: Path) -> None:
    """Copy the folder ``source`` to ``target`` through a temporary sibling, so ``target`` is whole or old."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def save_run(run: Path, record: Path) -> str:
    """Copy one run folder's records into ``record`` (see the module docstring), built aside then swapped in;
    returns what was left out, if anything."""
    staged = record.with_name(record.name + ".partial")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir(parents=True)
    for name in RECORD_FILES:
        if (run / name).exists():
            shutil.copy2(run / name, staged / name)
    checkpoint = newest_checkpoint(run)
    folder, target = (
        (run / "global", staged / "global")
        if (run / "global").is_dir()
        else (checkpoint, None if checkpoint is None else staged / "checkpoints" / checkpoint.name)
    )
    left_out = ""
    if folder is not None and target is not None:
        size = megabytes(folder)
        if size <= MAX_KEPT_MB:
            shutil.copytree(folder, target)
        else:
            left_out = f" ({folder.name}, {size:.0f} MB, not kept: over {MAX_KEPT_MB:.0f} MB; this record cannot resume)"
    shutil.rmtree(record, ignore_errors=True)
    staged.rename(record)
    return left_out


def copy_base_models(source: Path, destination: Path) -> list[Path]:
    """Copy the base-model evaluations (``base-model_seed-*.json``, written once) that ``destination`` lacks."""
    copied = []
    for base in source.rglob("base-model_seed-*.json"):
        target = destination / base.relative_to(source)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(base, target)
            copied.append(target)
    return copied


def save(runs: Path, records: Path) -> list[str]:
    """Save every run under ``runs`` whose record is missing or older; returns one line per saved run."""
    done = []
    for run in run_folders(runs):
        record = records / run.relative_to(runs)
        finished = (run / "global").is_dir()
        if (record / "global").is_dir() or (
            not finished and rounds_logged(record) >= rounds_logged(run) and record.exists()
        ):
            continue
        left_out = save_run(run, record)
        done.append(f"saved {run}: {rounds_logged(run)} rounds{', finished' if finished else ''}{left_out}")
    return done + [f"saved {target}" for target in copy_base_models(runs, records)]


def restore(records: Path, runs: Path) -> list[str]:
    """Copy back every record whose run is missing under ``runs`` or has fewer logged rounds there."""
    done = []
    for record in run_folders(records):
        run = runs / record.relative_to(records)
        if (run / "global").is_dir() or (run.exists() and rounds_logged(run) >= rounds_logged(record)):
            continue
        replace_tree(record, run)
        done.append(f"restored {run}: {rounds_logged(record)} rounds")
    return done + [f"restored {target}" for target in copy_base_models(records, runs)]


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("save", "restore"):
        print("usage: records.py save [runs] [experiments/records] | restore [experiments/records] [runs]")
        return 2
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
