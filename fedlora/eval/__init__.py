"""Evaluation of the global adapter: held-out loss/perplexity/accuracy, generation metrics, a registry for
more metrics, and standard benchmarks (:mod:`fedlora.eval.benchmarks`). The names below load on first use,
so that the torch-free parts (the benchmark task table read by ``fedlora --help``) import without torch."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "evaluate_loss": "fedlora.eval.loss",
    "METRICS": "fedlora.eval.registry",
    "register_metric": "fedlora.eval.registry",
    "run_evaluators": "fedlora.eval.registry",
}

__all__ = ["METRICS", "evaluate_loss", "register_metric", "run_evaluators"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedlora.eval' has no attribute {name!r}")
