"""Evaluators by name (``eval.metrics`` in the config). Each takes the model with the global adapter
loaded, the encoder, the clients and the split, and returns flat metrics. Generation metrics (ROUGE-L,
exact match, task scorers) plug in here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData
from fedlora.eval.loss import evaluate_loss

Evaluator = Callable[[torch.nn.Module, Encoder, list[ClientData], str, int], dict[str, float]]

EVALUATORS: dict[str, Evaluator] = {"loss": evaluate_loss}


def run_evaluators(
    names: list[str],
    model: torch.nn.Module,
    encoder: Encoder,
    clients: list[ClientData],
    split: str,
    batch_size: int,
) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for name in names:
        if name not in EVALUATORS:
            raise ValueError(f"eval.metrics: unknown evaluator {name!r} (allowed: {', '.join(EVALUATORS)})")
        metrics.update(EVALUATORS[name](model, encoder, clients, split, batch_size))
    return metrics
