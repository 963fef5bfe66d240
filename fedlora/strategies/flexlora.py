"""FlexLoRA (Bai et al., 2024): clients at their own LoRA ranks, the server redistributes by SVD.

Per target module, with client i at rank r_i, s_i = alpha / r_i and p_i = n_i / sum_j n_j:

    Delta = sum_i p_i s_i B_i A_i                       (d x k, replaces the previous global Delta)
    Delta = U S V^T                                     (computed in factored form: fedlora.linalg.lowrank_svd)
    global at r_max:  B = U[:, :r] S[:r] / s_rmax,  A = V[:, :r]^T       (split "b", the reference's)
                  or  B = U[:, :r] S[:r]^1/2 / s_rmax^1/2,  A = S[:r]^1/2 V[:, :r]^T / s_rmax^1/2  (split "sqrt")

so that s_rmax B A is the best rank-r_max approximation of Delta. A client of rank r receives the first r
columns of B (times s_rmax / s_r) and the first r rows of A, which is the best rank-r approximation of Delta
(:func:`fedlora.adapters.ranks.truncate_state`); the same slicing serves every rank, so one SVD per module
serves the whole federation. When Delta has rank below r_max (few or small clients this round), the missing
rows of A are a seeded orthonormal completion and B is zero there, so every rank direction stays trainable.

The global model used for evaluation and export is W0 + (the rank-r_max truncation of Delta), r_max per
module kind being the largest rank any client has. With ``evaluate_full_delta`` the final evaluation also
measures W0 + Delta itself (rank up to sum r_i, applied to the base weights in factored form through the
merged-offset channel, :mod:`fedlora.adapters.merged`), recorded as ``eval_<metric>_full_delta``: what the
truncation to r_max costs. Round 1: every client gets the seeded initial adapter
(PEFT init, B = 0) at r_max truncated to its rank. Task heads (classification) are averaged with p_i.
Local training is that of fedit (AdamW), fedavg (SGD) or fedprox (SGD + mu): ``options.local``.
The SVD runs on ``compute.server_device`` (float64 there; what travels is CPU float32).
"""

from __future__ import annotations

import zlib
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.merged import MergeHistory
from fedlora.adapters.ranks import module_factors
from fedlora.adapters.state import AdapterState
from fedlora.linalg import lowrank_svd, orthonormal_completion
from fedlora.strategies.base import GLOBAL, ClientReply, ServerState, StrategyOptions, example_weights
from fedlora.strategies.heterogeneous import HeterogeneousRankOptions, HeterogeneousRankStrategy
from fedlora.strategies.registry import register_strategy

#: the state's groups of the last round's untruncated Delta = (U S) Vh, by module (``evaluate_full_delta``)
FULL_DELTA_US, FULL_DELTA_VH = "full_delta_us", "full_delta_vh"


class FlexLoRAOptions(HeterogeneousRankOptions):
    factor_split: Literal["b", "sqrt"] = Field(
        "b", description="b: B = U S / s, A = V^T (the reference); sqrt: S^1/2 on each side"
    )
    evaluate_full_delta: bool = Field(
        False,
        description="the final evaluation also measures W0 + Delta untruncated (eval_*_full_delta); each "
        "checkpoint then also holds Delta's factors, d x (sum of the round's client ranks) per module, float64",
    )


@register_strategy
class FlexLoRA(HeterogeneousRankStrategy[FlexLoRAOptions]):
    """FlexLoRA: weighted sum of full-size updates, best rank-r approximation for each client."""

    name = "flexlora"
    Options: ClassVar[type[StrategyOptions]] = FlexLoRAOptions

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        p = example_weights(replies)
        scaling = self.setup.scaling
        current = state.adapter
        out: AdapterState = {}
        full_us: AdapterState = {}
        full_vh: AdapterState = {}
        for module, (a_key, b_key) in module_factors(current).items():
            A_old, B_old = current[a_key], current[b_key]
            r_out, dtype = A_old.shape[0], A_old.dtype
            device = torch.device(self.setup.device)
            Bs = [r.payload[b_key].to(device, torch.float64) for r in replies]
            As = [r.payload[a_key].to(device, torch.float64) for r in replies]
            weights = [p_i * scaling(A.shape[0]) for p_i, A in zip(p, As, strict=True)]
            U, S, Vh = lowrank_svd(Bs, As, weights)
            if self.options.evaluate_full_delta:
                full_us[module], full_vh[module] = (U * S).cpu(), Vh.cpu()
            r = min(r_out, S.shape[0])
            s_out = scaling(r_out)
            A_new = torch.zeros(A_old.shape, dtype=torch.float64, device=device)
            B_new = torch.zeros(B_old.shape, dtype=torch.float64, device=device)
            if self.options.factor_split == "b":
                B_new[:, :r] = U[:, :r] * (S[:r] / s_out)
                A_new[:r] = Vh[:r]
            else:
                root = S[:r].sqrt() / s_out**0.5
                B_new[:, :r] = U[:, :r] * root
                A_new[:r] = root[:, None] * Vh[:r]
            if r < r_out:
                seed = zlib.crc32(f"{self.setup.seed}/{server_round}/{module}".encode())
                A_new[r:] = orthonormal_completion(Vh[:r].cpu(), r_out - r, seed).to(device)
            out[a_key], out[b_key] = A_new.to("cpu", dtype), B_new.to("cpu", dtype)
        self.average_extra_tensors(state, replies, out)
        new = state.evolve({GLOBAL: {k: out[k] for k in current}})
        if self.options.evaluate_full_delta:  # the last round's untruncated factors (float64)
            new = new.evolve(
                {FULL_DELTA_US: full_us, FULL_DELTA_VH: full_vh}, {"full_delta_round": server_round}
            )
        return new

    def extra_evaluation_states(self, state: ServerState) -> dict[str, AdapterState]:
        """``full_delta``: W0 + Delta of the last round untruncated (the adapter at B = 0, Delta merged into the
        base weights in factored form); none before a round has aggregated."""
        us, vh = state.group(FULL_DELTA_US), state.group(FULL_DELTA_VH)
        if not us:
            return {}
        history = MergeHistory()
        history.add(int(state.facts["full_delta_round"]), {m: (us[m], vh[m]) for m in us})
        zero_b = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.adapter.items()}
        return {"full_delta": {**zero_b, **history.payload()}}
