"""fedlora: federated fine-tuning of language models with low-rank adapters.

Public API (``docs/api.md``)::

    import fedlora
    cfg = fedlora.load_config("my.yaml", ["federation.rounds=10"])
    result = fedlora.run(cfg)                  # RunResult: run_dir, records, final_state, metrics
    fedlora.evaluate(result.run_dir)           # the global adapter on the run's data

Extension points, each an open registry (or a Python entry point, or a module under ``plugins:``):
``register_strategy`` (a :class:`Strategy` subclass), ``register_client_hooks`` (a :class:`ClientHooks`
subclass), ``register_data_source``, ``register_partitioner``, ``register_metric``, ``register_model``.

Layout (one job per package): ``config`` (validated experiment config), ``data`` (sources, partitioners,
prompt encoding), ``models`` (base models, GGUF conversion, per-client architectures), ``adapters`` (LoRA via
PEFT, state format), ``client`` (generic local trainer, client hooks, personal state), ``protocol`` (the
messages), ``strategies`` (server methods and their wrappers), ``engine`` (rounds, transports, checkpoints),
``eval`` (metrics), ``tracking`` (metrics.jsonl, progress, plots), ``runner`` and ``cli``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from fedlora.version import __version__

# bitsandbytes (installed for model.quantization) warns at import, in every process that imports peft, that an
# optional CPU kernel package is missing; it only matters for a quantized model on the CPU (docs/benchmarks.md)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# name -> module; imported on first use so that ``import fedlora`` stays light (torch loads when needed)
_EXPORTS = {
    "ExperimentConfig": "fedlora.config.schema",
    "load_config": "fedlora.preflight",
    "ConfigError": "fedlora.errors",
    "run": "fedlora.runner",
    "RunResult": "fedlora.runner",
    "Strategy": "fedlora.strategies.base",
    "StrategyOptions": "fedlora.strategies.base",
    "ServerSetup": "fedlora.strategies.base",
    "ServerState": "fedlora.strategies.base",
    "Review": "fedlora.strategies.base",
    "Server": "fedlora.engine.server",
    "example_weights": "fedlora.strategies.base",
    "weighted_average": "fedlora.strategies.base",
    "ClientInstruction": "fedlora.protocol",
    "ClientReply": "fedlora.protocol",
    "ClientHooks": "fedlora.client.hooks",
    "ClientContext": "fedlora.client.hooks",
    "register_client_hooks": "fedlora.client.hooks",
    "register_strategy": "fedlora.strategies.registry",
    "register_data_source": "fedlora.data.federation",
    "SourceData": "fedlora.data.federation",
    "SourceRequest": "fedlora.data.federation",
    "register_partitioner": "fedlora.data.partition",
    "register_metric": "fedlora.eval.registry",
    "register_model": "fedlora.models.loading",
    "Example": "fedlora.data.examples",
    "ClientData": "fedlora.data.examples",
    "Federation": "fedlora.data.examples",
}

__all__ = [*_EXPORTS, "evaluate", "__version__"]


def evaluate(run_dir: Any, overrides: list[str] | None = None, split: str | None = None) -> dict[str, float]:
    """Evaluate ``run_dir``'s global adapter on the run's data (``fedlora eval``)."""
    from pathlib import Path

    from fedlora.compute import quiet_libraries
    from fedlora.runner import evaluate_run

    with quiet_libraries():
        return evaluate_run(Path(run_dir), overrides, split)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fedlora' has no attribute {name!r}")


if TYPE_CHECKING:  # for type checkers and IDEs
    from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks  # noqa: F401
    from fedlora.config.schema import ExperimentConfig  # noqa: F401
    from fedlora.data.examples import ClientData, Example, Federation  # noqa: F401
    from fedlora.data.federation import SourceData, SourceRequest, register_data_source  # noqa: F401
    from fedlora.data.partition import register_partitioner  # noqa: F401
    from fedlora.engine.server import Server  # noqa: F401
    from fedlora.errors import ConfigError  # noqa: F401
    from fedlora.eval.registry import register_metric  # noqa: F401
    from fedlora.models.loading import register_model  # noqa: F401
    from fedlora.preflight import load_config  # noqa: F401
    from fedlora.protocol import ClientInstruction, ClientReply  # noqa: F401
    from fedlora.runner import RunResult, run  # noqa: F401
    from fedlora.strategies.base import (  # noqa: F401
        Review,
        ServerSetup,
        ServerState,
        Strategy,
        StrategyOptions,
        example_weights,
        weighted_average,
    )
    from fedlora.strategies.registry import register_strategy  # noqa: F401
