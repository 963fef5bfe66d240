"""A fedlora plugin: a server strategy, a data source and a metric of your own, in one importable module.

List it in a config (``plugins: [my_plugin]``) with its folder on PYTHONPATH: every process that reads the
config (``fedlora run``, ``--resume``, ``fedlora eval``, Flower nodes) imports it before looking up names.
"""

from __future__ import annotations

import csv
from typing import ClassVar

import torch
from pydantic import Field

import fedlora
from fedlora.eval.loss import evaluate_loss


# --- a strategy: FedAvg with server momentum (FedAvgM, Hsu et al. 2019) on the LoRA factors --------------
class FedAvgMOptions(fedlora.StrategyOptions):
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="server momentum beta")
    server_lr: float = Field(1.0, gt=0.0, description="server learning rate")


@fedlora.register_strategy
class FedAvgM(fedlora.Strategy):
    """v <- beta v + (mean_i p_i theta_i - theta);  theta <- theta + eta v  (per tensor).

    The velocity is a group of the server state (``velocity``): the engine checkpoints it with the adapter
    and a resume continues it exactly; the method writes no persistence code."""

    name = "fedavgm"
    Options: ClassVar[type[fedlora.StrategyOptions]] = FedAvgMOptions

    def initialize(self, setup):
        state = super().initialize(setup)
        return state.evolve({"velocity": {k: torch.zeros_like(v) for k, v in state.adapter.items()}})

    def aggregate(self, state, server_round, replies):
        mean = fedlora.weighted_average([r.payload for r in replies], fedlora.example_weights(replies))
        beta, eta = self.options.momentum, self.options.server_lr
        theta, velocity = state.adapter, state.group("velocity")
        velocity = {k: beta * velocity[k] + (mean[k] - theta[k]) for k in theta}
        return state.evolve(
            {"global": {k: theta[k] + eta * velocity[k] for k in theta}, "velocity": velocity}
        )


# --- a data source: a CSV file with instruction, output and (optional) category columns ------------------
@fedlora.register_data_source("csv")
def csv_source(request):
    with open(request.data.path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    examples = [
        fedlora.Example(
            instruction=row["instruction"], output=row["output"], category=row.get("category", "")
        )
        for row in rows
    ]
    return fedlora.SourceData(f"{request.data.path} ({len(examples)} CSV rows)", examples)


# --- a metric: the worst client's held-out loss (how the global adapter serves its least-served client) ---
@fedlora.register_metric("worst-client-loss")
def worst_client_loss(model, encoder, clients, eval_cfg):
    losses = [
        evaluate_loss(model, encoder, [c], eval_cfg.split, eval_cfg.batch_size)["eval_loss"] for c in clients
    ]
    return {"eval_worst_client_loss": max(losses)}
