"""Evaluators by name (``eval.metrics`` / ``eval.final_metrics`` in the config): an open registry.

Built-ins: ``loss`` (held-out loss, perplexity or accuracy: :mod:`fedlora.eval.loss`) and the generation
metrics ``rouge-l`` and ``exact-match`` (:mod:`fedlora.eval.generation`, one shared generation pass for all
of them). A user metric is ``fn(model, encoder, clients, eval_cfg) -> {"eval_<name>": value, ...}`` registered
with ``fedlora.register_metric("name")``; it reads the model with the global adapter loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedlora.config.schema import EvalConfig
from fedlora.data.encoding import Encoder
from fedlora.data.examples import ClientData
from fedlora.eval.generation import SCORER_SOURCES, SCORERS, evaluate_generation
from fedlora.eval.loss import evaluate_loss
from fedlora.registry import Registry

Metric = Callable[[torch.nn.Module, Encoder, list[ClientData], EvalConfig], dict[str, float]]
METRICS: Registry[Metric] = Registry("metric", "eval.metrics")


def register_metric(name: str, sources: tuple[str, ...] | None = None) -> Callable[[Metric], Metric]:
    """Decorator: ``fn(model, encoder, clients, eval_cfg) -> dict of eval_* figures``. ``sources``: the only
    ``data.source`` values it can score (kept on the registered function; None: any)."""
    register = METRICS.register(name)

    def add(fn: Metric) -> Metric:
        fn.fedlora_sources = sources  # type: ignore[attr-defined]  # the fact lives on the registered entry
        return register(fn)

    return add


def metric_sources(metric: Metric) -> tuple[str, ...] | None:
    """The data sources a registered metric can score (None: any)."""
    return getattr(metric, "fedlora_sources", None)


@register_metric("loss")
def loss_metric(
    model: torch.nn.Module, encoder: Encoder, clients: list[ClientData], cfg: EvalConfig
) -> dict[str, float]:
    return evaluate_loss(model, encoder, clients, cfg.split, cfg.batch_size)


def _generation_metric(name: str) -> Metric:
    def metric(
        model: torch.nn.Module, encoder: Encoder, clients: list[ClientData], cfg: EvalConfig
    ) -> dict[str, float]:
        return evaluate_generation(
            [name], model, encoder, clients, cfg.split, cfg.batch_size, cfg.max_new_tokens
        )

    return metric


for _scorer in SCORERS:
    register_metric(_scorer, SCORER_SOURCES.get(_scorer))(_generation_metric(_scorer))


def run_evaluators(
    names: list[str],
    model: torch.nn.Module,
    encoder: Encoder,
    clients: list[ClientData],
    cfg: EvalConfig,
    predictions: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Every named metric; the generation metrics among them share one generation pass (whose per-example
    records go to ``predictions`` when given)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(
            f"eval.metrics: unknown evaluator(s) {unknown} (allowed: {', '.join(METRICS.names())})"
        )
    metrics: dict[str, float] = {}
    generation = [n for n in names if n in SCORERS]
    for name in names:
        if name not in SCORERS:
            metrics.update(METRICS.get(name)(model, encoder, clients, cfg))
    if generation:
        metrics.update(
            evaluate_generation(
                generation,
                model,
                encoder,
                clients,
                cfg.split,
                cfg.batch_size,
                cfg.max_new_tokens,
                predictions,
            )
        )
    return metrics
