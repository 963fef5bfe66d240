"""FedEx-LoRA (Singhal et al., ACL 2025): average A and B, and merge the averaging error into the base weights.

Per target module, with one rank r for every client, s = alpha / r and p_i = n_i / sum_j n_j:

    A_bar = sum_i p_i A_i,      B_bar = sum_i p_i B_i,
    R = sum_i p_i s B_i A_i - s B_bar A_bar                 (the residual of averaging the factors separately)
    W0 <- W0 + R

so that W0 + s B_bar A_bar moves by exactly sum_i p_i s B_i A_i, the ideal update. R travels in factored form,

    R = [s p_1 B_1, ..., s p_K B_K, -s B_bar] [A_1; ...; A_K; A_bar]     (rank <= (K + 1) r, never d x k),

inside the merged offset that every payload carries (:mod:`fedlora.strategies.merging`); the clients then
start from (B_bar, A_bar). Task heads would be averaged, but the method is causal-LM only here.

Differences from the paper's code: the reference averages with equal weights (1/K) and scales the residual
by alpha / r; fedlora weights by examples (as its other methods do, equal when clients are equal) and sends
the residual factored instead of adding a dense d x k matrix on a shared model object.
"""

from __future__ import annotations

import torch

from fedlora.adapters.ranks import module_factors
from fedlora.linalg import tensor_sum
from fedlora.strategies.base import (
    ClientReply,
    ServerSetup,
    ServerState,
    StrategyOptions,
    example_weights,
    weighted_average,
)
from fedlora.strategies.fedavg import require_one_rank
from fedlora.strategies.merging import MergingStrategy
from fedlora.strategies.registry import register_strategy


def exact_residual(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with P Q = sum_i w_i s B_i A_i - s B_bar A_bar (module docstring). B_i: d x r, A_i: r x k."""
    B_bar = tensor_sum(w * B for w, B in zip(weights, Bs, strict=True))
    A_bar = tensor_sum(w * A for w, A in zip(weights, As, strict=True))
    P = torch.cat([scale * w * B for w, B in zip(weights, Bs, strict=True)] + [-scale * B_bar], dim=1)
    Q = torch.cat([*As, A_bar], dim=0)
    return P, Q


@register_strategy
class FedExLoRA(MergingStrategy[StrategyOptions]):
    """FedEx-LoRA: FedIT's averages plus the exact residual merged into the base weights."""

    name = "fedex-lora"
    default_optimizer = "adamw"

    def initialize(self, setup: ServerSetup) -> ServerState:
        require_one_rank(self.name, setup)
        return super().initialize(setup)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        p = example_weights(replies)
        averaged = weighted_average([r.payload for r in replies], p)
        device = torch.device(self.setup.device)
        increment = {}
        for module, (a_key, b_key) in module_factors(averaged).items():
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            increment[module] = exact_residual(Bs, As, p, self.setup.scaling(As[0].shape[0]))
        return self.merge(state, server_round, increment, averaged)
