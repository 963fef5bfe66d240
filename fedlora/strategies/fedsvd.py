"""FedSVD (Lee et al., NeurIPS 2025): clients train and send only B; the server re-bases A by an SVD.

Each round the clients receive the adapter (B, A), train B with A frozen, and send B. Per target module the
server averages B and re-factors the product (s = alpha / r, p_i = n_i / sum_j n_j):

    B_bar = sum_i p_i B_i,      B_bar A = U S V^T  (thin SVD, rank r, from the factors: fedlora.linalg),
    A <- V^T[:r],               B <- U[:, :r] S[:r]

so s B A is unchanged by the re-basing (exact aggregation, like FFA-LoRA), but A is no longer a fixed random
matrix: its rows are the right singular vectors of the current update (orthonormal, which keeps the B-only
training well conditioned). When B_bar A has rank below r (round 1 from B = 0 with few clients), the missing
rows of A are a seeded orthonormal completion and B is zero there. DP-SGD noise goes on B only (A is
computed by the server from released B's). What travels: the whole adapter down, B up. Needs one rank for
every client. The SVD runs on ``compute.server_device`` in float64.

A classification head is frozen at its initialisation (``head: frozen``, the default: the reference's
``freeze_target_layers`` in ``misc/utils.py`` of seanie12/fed-svd freezes ``classifier`` for its RoBERTa and
ViT runs), or trained and averaged with B (``head: trained``). The local optimizer: the reference uses SGD for
RoBERTa / ViT and AdamW otherwise (``get_optimizer`` in ``fedmm/fedavg/client.py``); fedlora's default is
AdamW (its models are decoder LMs), ``client.optimizer: sgd`` for the encoder setting.

The re-basing runs every round, the reference's default (``--recalculate-svd-period 1``, ``parser.py``).

Differences from the paper's code: the reference clients send the change of B in the round (``theta_diff``),
which the server adds to its B (``Server.aggregate``, ``fedmm/fedavg/server.py``); fedlora's clients send B
itself (the same average, since they all start from the same B).
"""

from __future__ import annotations

import zlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.ranks import module_factors
from fedlora.linalg import lowrank_svd, orthonormal_completion
from fedlora.strategies.base import GLOBAL, ClientReply, ServerState, StrategyOptions
from fedlora.strategies.fedavg import OneFactorAverage
from fedlora.strategies.registry import register_strategy


class FedSVDOptions(StrategyOptions):
    head: Literal["frozen", "trained"] = Field(
        "frozen",
        description="frozen: a classification head keeps its initialisation (the reference); trained",
    )


@register_strategy
class FedSVD(OneFactorAverage[FedSVDOptions]):
    """FedSVD: B-only training and upload; the server re-bases (B, A) by an SVD of B_bar A each round."""

    name = "fedsvd"
    default_optimizer = "adamw"
    Options: ClassVar[type[StrategyOptions]] = FedSVDOptions

    def frozen_heads(self) -> bool:
        return self.options.head == "frozen"

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        averaged = super().aggregate(state, server_round, replies).adapter  # B_bar (and heads), A as sent
        out = dict(averaged)
        device = torch.device(self.setup.device)
        for module, (a_key, b_key) in module_factors(averaged).items():
            A, B_bar = averaged[a_key], averaged[b_key]
            r, dtype = A.shape[0], A.dtype
            U, S, Vh = lowrank_svd([B_bar.to(device, torch.float64)], [A.to(device, torch.float64)], [1.0])
            keep = int((S[0] * 1e-12 < S).sum()) if S.numel() and S[0] > 0 else 0
            keep = min(keep, r)
            A_new = torch.zeros(A.shape, dtype=torch.float64)
            B_new = torch.zeros(B_bar.shape, dtype=torch.float64)
            A_new[:keep] = Vh[:keep].cpu()
            B_new[:, :keep] = (U[:, :keep] * S[:keep]).cpu()
            if keep < r:  # rank-deficient: complete A's rows to an orthonormal basis (B is zero there)
                seed = zlib.crc32(f"{self.setup.seed}/{server_round}/{module}".encode())
                A_new[keep:] = orthonormal_completion(A_new[:keep], r - keep, seed)
            out[a_key], out[b_key] = A_new.to(dtype), B_new.to(dtype)
        return state.evolve({GLOBAL: out})
