"""LoRA-FAIR (Bian et al., ICCV 2025): average A and B, then correct the averaged B on the server.

Averaging the factors separately gives (sum_i p_i B_i)(sum_i p_i A_i), not the ideal update
Delta = sum_i p_i B_i A_i (p_i = n_i / sum_j n_j). LoRA-FAIR keeps A_bar = sum_i p_i A_i and refines
B_bar = sum_i p_i B_i by a correction dB so that (B_bar + dB) A_bar comes closest to Delta, without moving
far from B_bar (the clients' next starting point should stay the average they know). Two objectives:

``correction: cosine`` (the default: the paper's, Eq. 5 of Bian et al., with its cosine similarity and
lambda = 0.01; the authors publish no code):

    dB = argmin_dB  1 - cos(Delta, (B_bar + dB) A_bar) + lambda ||dB||_F

solved on the server by L-BFGS from dB = 0 (the paper says it solves it numerically with SGD; the minimiser is
the same), every inner product from r x r Gram matrices (<Delta, B A_bar> = sum_i p_i tr(B_i^T B A_bar A_i^T),
||B A_bar||^2 = tr(B^T B A_bar A_bar^T)), never a d x k matrix.

``correction: least-squares`` (fedlora's closed form, an objective of its own: it also matches the size of
Delta, which the scale-free cosine does not):

    B' = argmin_B ||Delta - B A_bar||_F^2 + lambda ||B - B_bar||_F^2
       = (Delta A_bar^T + lambda B_bar) (A_bar A_bar^T + lambda I)^-1

with lambda = ``correction_reg`` x tr(A_bar A_bar^T) / r (scale-free; default 1e-3). Delta A_bar^T is
computed from the factors, sum_i p_i B_i (A_i A_bar^T) (d x r). The next round's clients start from (B', A_bar):
the "initialisation refinement" of the title. What travels: the same as FedIT. Needs one rank for every client.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.ranks import module_factors
from fedlora.linalg import tensor_sum
from fedlora.strategies.base import (
    GLOBAL,
    ClientReply,
    ServerState,
    StrategyOptions,
    example_weights,
    weighted_average,
)
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy


class LoRAFAIROptions(StrategyOptions):
    correction: Literal["cosine", "least-squares"] = Field(
        "cosine", description="cosine: the paper's objective (numerical); least-squares: a closed form"
    )
    correction_reg: float | None = Field(
        None,
        ge=0.0,
        description="lambda: 0.01 for cosine (the paper's); for least-squares a multiple of tr(A A^T) / r "
        "(default 1e-3)",
    )
    solver_steps: int = Field(100, ge=1, description="cosine: L-BFGS iterations on dB")


def cosine_correction(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], reg: float, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B_bar + dB, A_bar)`` minimising 1 - cos(Delta, (B_bar + dB) A_bar) + reg ||dB||_F (module docstring),
    in float64 from Gram matrices. Shapes: B_i d x r, A_i r x k. Returns B_bar itself when Delta = 0."""
    A_bar = tensor_sum(w * A for w, A in zip(weights, As, strict=True))
    B_bar = tensor_sum(w * B for w, B in zip(weights, Bs, strict=True))
    cross = [A_bar @ A.T for A in As]  # A_bar A_i^T, r x r
    delta_sq = tensor_sum(
        wi * wj * torch.trace((Bi.T @ Bj) @ (Aj @ Ai.T))
        for wi, Bi, Ai in zip(weights, Bs, As, strict=True)
        for wj, Bj, Aj in zip(weights, Bs, As, strict=True)
    )
    gram = A_bar @ A_bar.T
    if float(delta_sq) <= 0.0:
        return B_bar, A_bar

    def objective(dB: torch.Tensor) -> torch.Tensor:
        B = B_bar + dB
        inner = tensor_sum(
            w * torch.trace((Bi.T @ B) @ c) for w, Bi, c in zip(weights, Bs, cross, strict=True)
        )
        pred_sq = torch.trace((B.T @ B) @ gram)
        cosine = inner / torch.sqrt(delta_sq * pred_sq).clamp_min(1e-300)
        return 1.0 - cosine + reg * torch.sqrt((dB * dB).sum() + 1e-300)

    dB = torch.zeros_like(B_bar, requires_grad=True)
    solver = torch.optim.LBFGS([dB], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12)

    def closure() -> torch.Tensor:
        solver.zero_grad()
        loss = objective(dB)
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(closure)
    return (B_bar + dB).detach(), A_bar


def corrected_b(
    Bs: list[torch.Tensor], As: list[torch.Tensor], weights: list[float], reg: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B', A_bar)`` of the LoRA-FAIR rule (module docstring), in float64. Shapes: B_i d x r, A_i r x k."""
    A_bar = tensor_sum(w * A for w, A in zip(weights, As, strict=True))
    B_bar = tensor_sum(w * B for w, B in zip(weights, Bs, strict=True))
    gram = A_bar @ A_bar.T  # r x r
    target = tensor_sum(
        w * (B @ (A @ A_bar.T)) for w, B, A in zip(weights, Bs, As, strict=True)
    )  # Delta A_bar^T
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

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        p = example_weights(replies)
        out = weighted_average([r.payload for r in replies], p)  # heads, and the plain averages
        device = torch.device(self.setup.device)
        opts = self.options
        for a_key, b_key in module_factors(out).values():
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            if opts.correction == "cosine":
                reg = 0.01 if opts.correction_reg is None else opts.correction_reg
                B_new, A_bar = cosine_correction(Bs, As, p, reg, opts.solver_steps)
            else:
                reg = 1e-3 if opts.correction_reg is None else opts.correction_reg
                B_new, A_bar = corrected_b(Bs, As, p, reg)
            out[b_key] = B_new.to("cpu", out[b_key].dtype)
            out[a_key] = A_bar.to("cpu", out[a_key].dtype)
        return state.evolve({GLOBAL: out})
