"""Question: how long does the command line take to answer when it has nothing heavy to do?

``fedlora --help``, ``fedlora run --help``, ``fedlora --version`` and a config error that needs the registries'
names (``fedlora run strategy.name=nope``, exit 2) each run as a fresh process, ``--repeat`` times
(median). Anchors measured in the same run: ``python -c pass`` (the interpreter alone) and ``python -c "import
torch, transformers"`` (what a command pays once it imports the training stack). ``--against DIR`` also times
the same commands from another fedlora checkout (``PYTHONPATH=DIR``: an older commit's worktree), the before
of a before/after. Prints a table and one JSON line.

    python benchmarks/cli_startup.py [--repeat 5] [--against /tmp/old-checkout]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from fedlora.compute import cpu_model_name

COMMANDS = {
    "fedlora --help": ["--help"],
    "fedlora run --help": ["run", "--help"],
    "fedlora --version": ["--version"],
    "unknown strategy (exit 2)": ["run", "strategy.name=nope"],
}
ANCHORS = {
    "python -c pass": "pass",
    "import torch, transformers": "import torch, transformers",
}


def timed(code: str, repeat: int, pythonpath: str | None = None) -> float:
    """The median wall time of ``python -c code`` over ``repeat`` fresh processes, in seconds."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    times = []
    # run outside the checkout: `python -c` puts its working directory first on the path
    with tempfile.TemporaryDirectory() as elsewhere:
        for _ in range(repeat):
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-c", code], env=env, cwd=elsewhere, capture_output=True, check=False
            )
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def cli_code(args: list[str]) -> str:
    return f"import sys; from fedlora.cli import main; sys.exit(main({args!r}))"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--against", help="another fedlora checkout to time the same commands from")
    args = parser.parse_args()
    rows = []
    anchor = {name: timed(code, args.repeat) for name, code in ANCHORS.items()}
    for name, seconds in anchor.items():
        rows.append({"command": name, "seconds": seconds})
    for name, argv in COMMANDS.items():
        row = {"command": name, "seconds": timed(cli_code(argv), args.repeat)}
        if args.against:
            row["seconds_against"] = timed(cli_code(argv), args.repeat, args.against)
        rows.append(row)
    stack = anchor["import torch, transformers"]
    print(
        f"{'command':<30}{'s (median)':>12}{'vs torch import':>17}"
        + (f"{'--against s':>14}{'ratio':>8}" if args.against else "")
    )
    for row in rows:
        line = f"{row['command']:<30}{row['seconds']:>12.3f}{row['seconds'] / stack:>17.3f}"
        if "seconds_against" in row:
            line += f"{row['seconds_against']:>14.3f}{row['seconds'] / row['seconds_against']:>8.3f}"
        print(line)
    print(
        json.dumps({"benchmark": "cli_startup", "cpu": cpu_model_name(), "repeat": args.repeat, "rows": rows})
    )


if __name__ == "__main__":
    main()
