"""Evaluators by name (``eval.metrics`` / ``eval.final_metrics`` in the config).

``loss`` (held-out loss, perplexity or accuracy: :mod:`fedlora.eval.loss`) and the generation metrics
``rouge-l`` and ``exact-match`` (:mod:`fedlora.eval.generation`, one shared generation pass). Each reads the
model with the global adapter loaded, the encoder, the clients and the eval settings, and returns flat
``eval_*`` metrics.
"""

from __future__ import annotations

import torch

from fedlora.config.schema import EvalConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData
from fedlora.eval.generation import SCORERS, evaluate_generation
from fedlora.eval.loss import evaluate_loss

EVALUATORS: tuple[str, ...] = ("loss", *SCORERS)


def run_evaluators(
    names: list[str], model: torch.nn.Module, encoder: Encoder, clients: list[ClientData], cfg: EvalConfig
) -> dict[str, float]:
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"eval.metrics: unknown evaluator(s) {unknown} (allowed: {', '.join(EVALUATORS)})")
    metrics: dict[str, float] = {}
    if "loss" in names:
        metrics.update(evaluate_loss(model, encoder, clients, cfg.split, cfg.batch_size))
    generation = [n for n in names if n in SCORERS]
    if generation:
        metrics.update(
            evaluate_generation(
                generation, model, encoder, clients, cfg.split, cfg.batch_size, cfg.max_new_tokens
            )
        )
    return metrics
