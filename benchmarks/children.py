"""One benchmark variant per child process (clean peak memory, no warm caches shared): the child prints its
figures as one ``RESULT {json}`` line; the parent collects them."""

from __future__ import annotations

import json
import subprocess
import sys

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
