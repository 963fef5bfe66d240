"""LoRA-FAIR (Bian et al., ICCV 2025): average A and B, then correct the averaged B on the server.

Averaging the factors separately gives (sum_i p_i B_i)(sum_i p_i A_i), not the ideal update
Delta = sum_i p_i B_i A_i (p_i = n_i / sum_j n_j). LoRA-FAIR keeps A_bar = sum_i p_i A_i and refines
B_bar = sum_i p_i B_i by a correction dB so that (B_bar + dB) A_bar comes closest to Delta, without moving
far from B_bar (the clients' next starting point should stay the average they know):

    B' = argmin_B ||Delta - B A_bar||_F^2 + lambda ||B - B_bar||_F^2
       = (Delta A_bar^T + lambda B_bar) (A_bar A_bar^T + lambda I)^-1

with lambda = ``options.correction_reg`` x tr(A_bar A_bar^T) / r (scale-free). Delta A_bar^T is computed from
the factors, sum_i p_i B_i (A_i A_bar^T) (d x r), never as a d x k matrix. The next round's clients start from
(B', A_bar): the "initialisation refinement" of the title. What travels: the same as FedIT. Needs one rank for
every client.

Differences from the paper: the paper measures closeness with a similarity term and a regulariser on dB and
solves for dB numerically; fedlora uses the least-squares form above, which has this closed-form solution.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fedlora.adapters.ranks import module_factors
from fedlora.adapters.state import AdapterState
from fedlora.strategies.base import ClientReply, StrategyOptions, example_weights, weighted_average
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy


class LoRAFAIROptions(StrategyOptions):
    correction_reg: float = Field(
        1e-3, ge=0.0, description="lambda / (tr(A A^T) / r): how far B may move from the plain average"
    )


def corrected_b(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A_bar)`` of the LoRA-FAIR rule (module docstring), in float64. Shapes: B_i d x r, A_i r x k."""
    A_bar = sum(w * A for w, A in zip(weights, As, strict=True))
    B_bar = sum(w * B for w, B in zip(weights, Bs, strict=True))
    gram = A_bar @ A_bar.T  # r x r
    target = sum(w * (B @ (A @ A_bar.T)) for w, B, A in zip(weights, Bs, As, strict=True))  # Delta A_bar^T
    lam = reg * float(torch.trace(gram)) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    # B' (gram + lam I) = target + lam B_bar; gram + lam I is symmetric: solve from the right
    B_new = torch.linalg.solve(gram + lam * eye, (target + lam * B_bar).T).T
    return B_new, A_bar


@register_strategy
class LoRAFAIR(FactorAverage[LoRAFAIROptions]):
    """LoRA-FAIR: mean A, least-squares-corrected mean B (closest product to the ideal update)."""

    name = "lora-fair"
    default_optimizer = "adamw"
    linear_aggregate = False
    Options: ClassVar[type[StrategyOptions]] = LoRAFAIROptions

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        p = example_weights(replies)
        out = weighted_average([r.payload for r in replies], p)  # heads, and the plain averages
        device = self.server_device
        for a_key, b_key in module_factors(out).values():
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            B_new, A_bar = corrected_b(Bs, As, p, self.options.correction_reg)
            out[b_key] = B_new.to("cpu", out[b_key].dtype)
            out[a_key] = A_bar.to("cpu", out[a_key].dtype)
        self.global_state = out
        return out
