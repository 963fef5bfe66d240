"""RoLoRA (Chen et al., NeurIPS 2025): alternating optimisation of the LoRA factors across rounds.

Odd rounds: every client trains B with A frozen and sends B; even rounds: A with B frozen, and sends A. The
server averages the trained factor with example weights p_i = n_i / sum_j n_j, which is exact for the product
because the other factor is common to all clients this round:

    odd:  s (sum_i p_i B_i) A = sum_i p_i s B_i A          even:  s B (sum_i p_i A_i) = sum_i p_i s B A_i

Round 1 trains B (PEFT starts B at zero, so training A first would see zero gradients). What travels: the
whole adapter down (clients keep no state between rounds), one factor up: half of FedIT's upload on square
modules. DP-SGD applies to the trained factor. Needs one rank for every client.

Differences from the paper's code: fedlora alternates per round (the paper also describes alternating within
a round's local steps); local training is FedIT's AdamW steps.
"""

from __future__ import annotations

from fedlora.strategies.base import StrategyOptions
from fedlora.strategies.fedavg import OneFactorAverage
from fedlora.strategies.registry import register_strategy


@register_strategy
class RoLoRA(OneFactorAverage[StrategyOptions]):
    """RoLoRA: B in odd rounds, A in even rounds; exact averages of the trained factor."""

    name = "rolora"
    default_optimizer = "adamw"

    def trained_factor(self, server_round: int) -> str:
        return "B" if server_round % 2 == 1 else "A"
