"""Run the fedlora CLI and SIGKILL this very process at a named point: the N-th call of one function, before
or after it runs. Such a point exists whatever the machine's load (a kill timed by the wall clock may land
anywhere or nowhere), so a crash test always kills, and always at the same step.

Usage: ``python kill_point.py MODULE:ATTR[.ATTR] N before|after -- fedlora CLI arguments...``
(``MODULE:ATTR`` is the name as the calling module sees it: ``fedlora.engine.checkpoint:save_file``)."""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from typing import Any


def arm(target: str, nth: int, when: str) -> None:
    """Replace ``target`` by a wrapper that SIGKILLs the process at its ``nth`` call (``when``: before/after)."""
    module_name, _, path = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    target, nth, when, separator, *cli = sys.argv[1:]
    assert separator == "--" and when in ("before", "after"), __doc__
    arm(target, int(nth), when)
    from fedlora.cli import main

    sys.exit(main(cli))
