"""One benchmark variant per child process (clean peak memory, no warm caches shared): the child prints its
figures as one ``RESULT {json}`` line; the parent collects them."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PREFIX = "RESULT "


def report(figures: dict) -> None:
    """In the child: the figures, as the line :func:`run_child` reads."""
    print(PREFIX + json.dumps(figures))


def run_child(command: list[str], label: str) -> dict | None:
    """Run ``command`` and return its figures, or None (its stderr's tail printed) when it failed."""
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(PREFIX)]
    if done.returncode != 0 or not lines:
        print(f"{label}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1].removeprefix(PREFIX))


def run_self(script: str, label: str, rounds: int, overrides: list[str], *extra: str) -> dict | None:
    """A benchmark's own ``--one LABEL`` in a child process (``script``: the benchmark's ``__file__``) with
    ``--rounds``, the config overrides (``-o``) and ``extra`` arguments: its figures, or None."""
    command = [sys.executable, script, "--one", label, "--rounds", str(rounds), *extra]
    for item in overrides:
        command += ["-o", item]
    return run_child(command, label)


def default_experiment(rounds: int, overrides: list[str], folder: Path) -> tuple[list[dict], float, str]:
    """The built-in default experiment in this process for ``rounds`` rounds, evaluated after the last, at
    ``compute.precision: fp32`` (so that what a benchmark varies is the only difference), with ``overrides``,
    run into ``folder``: its round records, its wall seconds and the CPU's name."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedlora import load_config
    from fedlora.compute import cpu_model_name
    from fedlora.config.loader import builtin_config_path
    from fedlora.runner import run

    base = [
        f"federation.rounds={rounds}",
        f"eval.every={rounds}",
        "compute.precision=fp32",
        "output.plot=false",
    ]
    started = time.perf_counter()
    result = run(load_config(builtin_config_path(), [*base, *overrides]), folder, show_progress=False)
    return result.records, time.perf_counter() - started, cpu_model_name()


def variant_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments every one-variant-per-process benchmark takes: ``--rounds``, ``-o key=value`` overrides,
    and the internal ``--one LABEL`` of a child."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-o", "--override", action="append", default=[], help="extra config override")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    return parser


def variant_rows(
    script: str,
    args: argparse.Namespace,
    labels: list[str],
    run_one: Callable[[str, int, list[str], Path], dict],
    progress: Callable[[dict], str],
) -> list[dict] | None:
    """A child (``--one``): run its variant in a temporary folder and report it (None). The parent: each of
    ``labels`` in its own child process, one after another; the figures of those that ran (``progress``: the
    line printed to stderr as each finishes)."""
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            report(run_one(args.one, args.rounds, args.override, Path(tmp) / "run"))
        return None
    rows = []
    for label in labels:
        figures = run_self(script, label, args.rounds, args.override)
        if figures is not None:
            rows.append(figures)
            print(f"  {label}: {progress(figures)}", file=sys.stderr, flush=True)
    return rows
