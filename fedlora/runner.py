"""The public face of a run's life (:mod:`fedlora.session`): config -> data, model, adapters, strategy ->
engine -> run directory, and what can be done with a finished run.

Run directory layout::

    config.yaml            full resolved config
    clients.json           every client's name and split sizes
    run.json               base model folder, task, label names, fedlora version
    metrics.jsonl          one JSON object per round
    checkpoints/round_N/   server state to resume from (newest few)
    global/                final global adapter, a standard PEFT adapter folder
    curves.png             loss per round
"""

from __future__ import annotations

from fedlora.session.evaluate import evaluate_run
from fedlora.session.export import export_adapter, export_merged
from fedlora.session.lifecycle import (
    RunResult,
    build_simulation,
    flower_client_app,
    flower_server_app,
    run,
    run_experiment,
)
from fedlora.session.resume import load_run_config

__all__ = [
    "RunResult",
    "build_simulation",
    "evaluate_run",
    "export_adapter",
    "export_merged",
    "flower_client_app",
    "flower_server_app",
    "load_run_config",
    "run",
    "run_experiment",
]
