"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge the exact sum into the base weights.

Per target module, with client i at its own rank r_i, its LoRA scale s_i and p_i = n_i / sum_j n_j:

    Delta = sum_i p_i s_i B_i A_i = [p_1 s_1 B_1, ..., p_K s_K B_K] [A_1; ...; A_K]     (stacking: exact)
    W0 <- W0 + Delta

and every client starts the next round from a fresh LoRA (B = 0, A newly drawn from PEFT's default
initialisation) at its own rank: ``fresh_a: per-client`` (the reference: each client's adapter is a new
``get_peft_model`` on a copy of the model, ``main.py`` of ATP-1010/FederatedLLM, so every client draws its own A;
seeded here by run seed, round, client and module) or ``fresh_a: shared`` (one A per round for all).

The scale: ``scale: reference`` gives every client s_i = 2 whatever its rank (the reference's heterogeneous
clients have ``lora_alpha = 2 * local_ranks[client_id]``; at one rank its default alpha 16, r 8 is s = 2 too);
``scale: adapter`` keeps the federation's rule (s_i = alpha / r_i, or ``adapter.scale``). Heterogeneous ranks need nothing
more: the stack is as wide as the sum of the ranks. What travels down: the stacked factors inside the
merged offset every payload carries (:mod:`fedlora.strategies.merging`); their bytes grow with clients x
rank each round, until the server folds them into a dense offset (then at most about twice the dense size).
Up: each client's adapter.

Differences from the paper's code (``fed_utils/model_aggregation.py``): the reference scales the stacked A's by
p_i and concatenates the B's (the same product; the LoRA scale is handled by its stacked adapter's config),
averages with example weights as here, and keeps one model object for all clients instead of sending the
stack.
"""

from __future__ import annotations

import math
import zlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.ranks import module_factors, truncate_state
from fedlora.adapters.state import AdapterState
from fedlora.config.schema import AdapterConfig
from fedlora.strategies.base import ClientReply, ServerState, StrategyOptions, example_weights
from fedlora.strategies.merging import MergingStrategy
from fedlora.strategies.registry import register_strategy


def stacked_factors(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], scales: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with P Q = sum_i w_i s_i B_i A_i: P = [w_i s_i B_i] (d x sum r_i), Q = [A_i] (sum r_i x k)."""
    P = torch.cat([w * s * B for w, s, B in zip(weights, scales, Bs, strict=True)], dim=1)
    return P, torch.cat(As, dim=0)


class FLoRAOptions(StrategyOptions):
    scale: Literal["reference", "adapter"] = Field(
        "reference",
        description="reference: s = 2 at every rank (lora_alpha = 2 r_i); adapter: the adapter's rule",
    )
    fresh_a: Literal["per-client", "shared"] = Field(
        "per-client",
        description="per-client: each client draws its own fresh A (the reference); shared: one A",
    )


@register_strategy
class FLoRA(MergingStrategy[FLoRAOptions]):
    """FLoRA: exact stacking aggregation merged into the base; a fresh LoRA for every client each round."""

    name = "flora"
    default_optimizer = "adamw"
    Options: ClassVar[type[StrategyOptions]] = FLoRAOptions

    @classmethod
    def adapter_config(cls, adapter: AdapterConfig, options: FLoRAOptions) -> AdapterConfig:
        """s = 2 at every rank under ``scale: reference`` (unless ``adapter.scale`` or rsLoRA is set)."""
        if options.scale == "reference" and adapter.scale is None and not adapter.use_rslora:
            return adapter.model_copy(update={"scale": 2.0})
        return adapter

    def __init__(self, options: FLoRAOptions | None = None) -> None:
        super().__init__(options)
        self._fresh: dict[
            tuple[int, int], AdapterState
        ] = {}  # (round, draw) -> fresh adapter, largest profile

    def fresh_adapter(self, shape_of: AdapterState, server_round: int, draw: int = -1) -> AdapterState:
        """B = 0 and A ~ U(-1/sqrt(k), 1/sqrt(k)) (PEFT's kaiming-uniform default), at the largest profile,
        seeded by (run seed, round, module) and, for a client's own draw, its id ``draw`` (-1: shared)."""
        out = {}
        tag = f"{self.setup.seed}/{server_round}" + (f"/client{draw}" if draw >= 0 else "")
        for key, tensor in shape_of.items():
            if ".lora_A." in key:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{tag}/{key}".encode()))
                bound = 1.0 / math.sqrt(tensor.shape[1])
                out[key] = (torch.rand(tensor.shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound)
                out[key] = out[key].to(tensor.dtype)
            else:
                out[key] = torch.zeros_like(tensor)
        return out

    def client_payload(self, state: ServerState, server_round: int, client_id: int) -> AdapterState:
        """Round 1: the seeded initial adapter (as every method); later rounds: a fresh one, the client's own
        (``fresh_a: per-client``) or the round's (``shared``)."""
        draw = client_id if self.options.fresh_a == "per-client" else -1
        if server_round == 1:
            fresh = state.adapter
        else:
            if not any(r == server_round for r, _ in self._fresh):
                self._fresh = {}  # a new round: the previous round's draws are done with (a cache)
            if (server_round, draw) not in self._fresh:
                self._fresh[(server_round, draw)] = self.fresh_adapter(state.adapter, server_round, draw)
            fresh = self._fresh[(server_round, draw)]
        return truncate_state(fresh, state.profiles[client_id], self.setup.scaling)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        p = example_weights(replies)
        device = torch.device(self.setup.device)
        current = state.adapter
        increment = {}
        for module, (a_key, b_key) in module_factors(current).items():
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            scales = [self.setup.scaling(A.shape[0]) for A in As]
            increment[module] = stacked_factors(Bs, As, p, scales)
        # the global adapter stays a zero update (B = 0): the model is the merged base alone
        zero_b = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in current.items()}
        return self.merge(state, server_round, increment, zero_b)
