"""The anchor of the FlexLoRA table: the base model with no adapter training (B = 0) on the same held-out
clients, with the same metrics. Prints one JSON line.

    python experiments/base_model_eval.py [configs/flexlora-ni-bucket.yaml] [key=value ...]
"""

from __future__ import annotations

import json
import sys

import torch

from fedlora.config import load_config
from fedlora.engine.embedded import evaluate_state, evaluation_clients
from fedlora.runner import build_simulation

if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1] if len(sys.argv) > 1 else "configs/flexlora-ni-bucket.yaml", sys.argv[2:])
    sim, _ = build_simulation(cfg)
    clients = evaluation_clients(cfg, sim.federation, final=True)
    metrics = evaluate_state(sim, sim.strategy.evaluation_state(), clients, ["loss", *cfg.eval.final_metrics])
    print(json.dumps({"base_model": cfg.model.name, "clients": [c.name for c in clients], **metrics}))
