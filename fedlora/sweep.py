"""``fedlora sweep``: a grid of runs from one config, run one after another into one folder, then compared.

The grid is the product of every ``--set key=v1,v2,...`` and the seeds. A seed sets every seed of the
experiment (``SEED_KEYS``: the data split, the adapter's initialisation, client sampling, faults), so the
spread over seeds includes partition and initialisation variance; ``--seed-keys`` narrows that. Each cell is
a run directory named after its settings (``name-flexlora_rank-8_seed-1``; a long value is cut and given its
digest) and listed with its overrides in ``sweep.json``; a finished cell is skipped and
an interrupted one resumed, so re-running the same command completes a sweep. At the end
:func:`fedlora.tracking.compare.compare_runs` writes compare.md / compare.json / compare.png in the folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from fedlora.config.loader import builtin_config_path
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.run_folder import atomic_write_text
from fedlora.errors import ConfigError
from fedlora.preflight import load_config


def split_values(text: str) -> list[str]:
    """Split ``a,b,[c, d]`` on commas outside brackets/braces: ``["a", "b", "[c, d]"]``."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    if any(not p for p in parts):
        raise ConfigError(f"sweep: empty value in {text!r}")
    return parts


def parse_axes(sets: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for item in sets:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"sweep --set needs key=v1,v2,... (got {item!r})")
        axes.append((key.strip(), split_values(values)))
    return axes


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its overrides and its folder name."""

    overrides: tuple[str, ...]
    name: str


#: what one sweep seed sets, unless ``--seed-keys`` says otherwise
SEED_KEYS = ("federation.seed", "data.seed", "adapter.init_seed", "faults.seed")


#: the longest a value may read in a folder name; a longer one (an options mapping) is cut and given its digest
VALUE_CHARS = 24


def readable_value(value: str) -> str:
    """``value`` in a folder name: letters, digits, ``.``, ``+``, ``-`` only; past :data:`VALUE_CHARS`
    characters, its first ones and 8 hex digits of its SHA-256 (two values never share a name)."""
    cleaned = re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-")
    if len(cleaned) <= VALUE_CHARS:
        return cleaned
    return f"{cleaned[:VALUE_CHARS].rstrip('-')}-{hashlib.sha256(value.encode()).hexdigest()[:8]}"


def cell_name(axes: list[tuple[str, str]], seed: int) -> str:
    """A short readable folder name: ``<last key part>-<value>`` per axis and the seed, joined by ``_`` (the
    whole dotted key, dots as ``-``, where two axes share a last part; long values cut, :func:`readable_value`).
    What a folder holds is its ``config.yaml`` and the sweep's ``sweep.json``, not its name."""
    short = [key.rsplit(".", 1)[-1] for key, _ in axes]
    parts = []
    for (key, value), name in zip(axes, short, strict=True):
        label = name if short.count(name) == 1 else key.replace(".", "-")
        parts.append(f"{label}-{readable_value(value)}")
    parts.append(f"seed-{seed}")
    return "_".join(parts)


def grid(
    axes: list[tuple[str, list[str]]], seeds: list[int], seed_keys: tuple[str, ...] = SEED_KEYS
) -> list[Cell]:
    cells: list[Cell] = []
    names: set[str] = set()
    for combo in itertools.product(*(values for _, values in axes)):
        for seed in seeds:
            overrides = tuple(f"{k}={v}" for (k, _), v in zip(axes, combo, strict=True))
            swept = {k for k, _ in axes}  # a seed the grid sets explicitly is the grid's
            overrides += tuple(f"{key}={seed}" for key in seed_keys if key not in swept)
            name = cell_name([(k, v) for (k, _), v in zip(axes, combo, strict=True)], seed)
            if name in names:  # two values that read the same once cleaned: keep the folders apart
                name = f"{name}_{len(cells)}"
            names.add(name)
            cells.append(Cell(overrides, name))
    return cells


def sweep_configs(
    config: str | None,
    sets: list[str],
    seeds: list[int],
    overrides: list[str] | None = None,
    seed_keys: tuple[str, ...] = SEED_KEYS,
) -> list[tuple[Cell, ExperimentConfig]]:
    """Every cell with its validated config. The base is what ``fedlora run`` would run with the same
    config file and overrides (:func:`fedlora.config.loader.read_config`); the cell's own settings apply
    on top of it."""
    base = config if config is not None or overrides else str(builtin_config_path())
    cells = grid(parse_axes(sets), seeds, seed_keys)
    return [(cell, load_config(base, [*(overrides or []), *cell.overrides])) for cell in cells]


def run_sweep(
    config: str | None,
    sets: list[str],
    seeds: list[int],
    output: Path,
    overrides: list[str] | None = None,
    show_progress: bool = True,
    seed_keys: tuple[str, ...] = SEED_KEYS,
) -> str:
    """Run every cell (validating all configs first), then compare them; returns the markdown table."""
    from fedlora.runner import run_experiment
    from fedlora.tracking.compare import compare_runs

    cells = sweep_configs(config, sets, seeds, overrides, seed_keys)
    output.mkdir(parents=True, exist_ok=True)
    index = {"cells": [{"folder": cell.name, "overrides": list(cell.overrides)} for cell, _ in cells]}
    atomic_write_text(output / "sweep.json", json.dumps(index, indent=1) + "\n")  # what each folder holds
    run_dirs = []
    for cell, cfg in cells:
        run_dir = output / cell.name
        run_dirs.append(run_dir)
        if (run_dir / "global").is_dir():  # written last, atomically: the run is finished
            continue
        resume = (run_dir / "metrics.jsonl").exists()
        run_experiment(cfg, run_dir, resume=resume, show_progress=show_progress)
    return compare_runs(run_dirs, output)
