"""Server strategies: the federated methods, one module each (server rule, client hooks, typed options).

Importing this package imports every method module in it, and each registers itself; ``STRATEGIES`` is the
open registry (user methods: :func:`register_strategy`, entry points, or ``plugins:`` in a config).
"""

import importlib
import pkgutil

from fedlora.strategies.base import (
    ClientInstruction,
    ClientReply,
    Strategy,
    StrategyOptions,
    weighted_average,
)
from fedlora.strategies.registry import STRATEGIES, build_strategy, register_strategy

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "STRATEGIES",
    "ClientInstruction",
    "ClientReply",
    "Strategy",
    "StrategyOptions",
    "build_strategy",
    "register_strategy",
    "weighted_average",
]
