"""Server strategies: the federated methods, each a small class with configure/aggregate hooks."""

from fedlora.strategies.base import ClientInstruction, ClientReply, Strategy, weighted_average
from fedlora.strategies.registry import STRATEGIES, build_strategy

__all__ = ["STRATEGIES", "ClientInstruction", "ClientReply", "Strategy", "build_strategy", "weighted_average"]
