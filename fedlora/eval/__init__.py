"""Evaluation of the global adapter: held-out loss/perplexity/accuracy; a registry for more metrics."""

from fedlora.eval.loss import evaluate_loss
from fedlora.eval.registry import METRICS, register_metric, run_evaluators

__all__ = ["METRICS", "evaluate_loss", "register_metric", "run_evaluators"]
