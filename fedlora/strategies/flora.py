"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge the exact sum into the base weights.

Per target module, with client i at its own rank r_i, s_i = alpha / r_i and p_i = n_i / sum_j n_j:

    Delta = sum_i p_i s_i B_i A_i = [p_1 s_1 B_1, ..., p_K s_K B_K] [A_1; ...; A_K]     (stacking: exact)
    W0 <- W0 + Delta

and every client starts the next round from a fresh LoRA (B = 0, A newly drawn from PEFT's default
initialisation, seeded by run seed, round and module) at its own rank. Heterogeneous ranks need nothing
more: the stack is as wide as the sum of the ranks. What travels down: the stacked factors inside the
merged offset every payload carries (:mod:`fedlora.strategies.merging`); their bytes grow with clients x
rank each round, until the server folds them into a dense offset (then at most about twice the dense size).
Up: each client's adapter.

Differences from the paper's code: the reference scales the stacked A's by p_i and concatenates the B's
(the same product; the LoRA scale is handled by its stacked adapter's config), averages with example weights
as here, and keeps one model object for all clients instead of sending the stack.
"""

from __future__ import annotations

import math
import zlib

import torch

from fedlora.adapters.ranks import module_factors, truncate_state
from fedlora.adapters.state import AdapterState
from fedlora.strategies.base import ClientReply, StrategyOptions, example_weights
from fedlora.strategies.merging import MergingStrategy
from fedlora.strategies.registry import register_strategy


def stacked_factors(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], scales: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with P Q = sum_i w_i s_i B_i A_i: P = [w_i s_i B_i] (d x sum r_i), Q = [A_i] (sum r_i x k)."""
    P = torch.cat([w * s * B for w, s, B in zip(weights, scales, Bs, strict=True)], dim=1)
    return P, torch.cat(As, dim=0)


@register_strategy
class FLoRA(MergingStrategy[StrategyOptions]):
    """FLoRA: exact stacking aggregation merged into the base; a fresh LoRA for every client each round."""

    name = "flora"
    default_optimizer = "adamw"

    def __init__(self, options: StrategyOptions | None = None) -> None:
        super().__init__(options)
        self._fresh: dict[int, AdapterState] = {}  # the round's fresh adapter at the largest profile

    def fresh_adapter(self, server_round: int) -> AdapterState:
        """B = 0 and A ~ U(-1/sqrt(k), 1/sqrt(k)) (PEFT's kaiming-uniform default), at the largest profile,
        seeded by (run seed, round, module)."""
        out = {}
        for key, tensor in self.global_state.items():
            if ".lora_A." in key:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}/{server_round}/{key}".encode()))
                bound = 1.0 / math.sqrt(tensor.shape[1])
                out[key] = (torch.rand(tensor.shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound)
                out[key] = out[key].to(tensor.dtype)
            else:
                out[key] = torch.zeros_like(tensor)
        return out

    def client_payload(self, server_round: int, client_id: int) -> AdapterState:
        """Round 1: the seeded initial adapter (as every method); later rounds: a fresh one."""
        if server_round not in self._fresh:
            fresh = self.fresh_adapter(server_round) if server_round > 1 else self.global_state
            self._fresh = {server_round: fresh}
        return truncate_state(self._fresh[server_round], self.client_profiles[client_id], self.lora_scaling)

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        p = example_weights(replies)
        device = self.server_device
        increment = {}
        for module, (a_key, b_key) in module_factors(self.global_state).items():
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            scales = [self.lora_scaling(A.shape[0]) for A in As]
            increment[module] = stacked_factors(Bs, As, p, scales)
        self.history.add(server_round, increment)
        # the global adapter stays a zero update (B = 0): the model is the merged base alone
        self.global_state = {
            k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in self.global_state.items()
        }
        return self.global_state
