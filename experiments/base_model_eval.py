"""The anchor row of a claim's table: the base model with no adapter training (B = 0) on the same held-out
examples, with the same metrics. Prints one JSON line.

    python experiments/base_model_eval.py [configs/flexlora-ni-bucket.yaml] [--seed N] [key=value ...]

``--seed N`` sets every seed a ``fedlora sweep --seeds N`` cell sets (``fedlora.sweep.SEED_KEYS``), so the
held-out examples are that cell's.
"""

from __future__ import annotations

import json
import sys

import torch

from fedlora import load_config
from fedlora.engine.embedded import evaluate_state, evaluation_clients
from fedlora.runner import build_simulation
from fedlora.sweep import SEED_KEYS

if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    config = args.pop(0) if args and not args[0].startswith("--") else "configs/flexlora-ni-bucket.yaml"
    if "--seed" in args:
        at = args.index("--seed")
        seed = int(args[at + 1])
        args[at : at + 2] = [f"{key}={seed}" for key in SEED_KEYS]
    cfg = load_config(config, args)
    sim, _ = build_simulation(cfg)
    clients = evaluation_clients(cfg, sim.federation, final=True)
    metrics = evaluate_state(sim, sim.strategy.evaluation_state(), clients, ["loss", *cfg.eval.final_metrics])
    print(json.dumps({"base_model": cfg.model.name, "clients": [c.name for c in clients], **metrics}))
