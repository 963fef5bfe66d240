"""Evaluation of the global adapter: held-out loss/perplexity/accuracy; a registry for more metrics."""

from fedlora.eval.loss import evaluate_loss
from fedlora.eval.registry import EVALUATORS, run_evaluators

__all__ = ["EVALUATORS", "evaluate_loss", "run_evaluators"]
