"""HetLoRA (Cho et al., 2024), the zero-padding baseline for heterogeneous ranks.

Per target module, client i at rank r_i (s_i = alpha / r_i) is zero-padded to the global rank r_max, with
B expressed at r_max's scaling so the padded pair carries the same update (s_rmax pad(B_i') pad(A_i) =
s_i B_i A_i, B_i' = B_i s_i / s_rmax). The padded factors are averaged with sparsity weights

    w_i = ||Delta_i||_F / sum_j ||Delta_j||_F,   Delta_i = s_i B_i A_i   (||B A||_F from r x r Gram matrices)
    A = sum_i w_i pad(A_i),   B = sum_i w_i pad(B_i')

(the weights use the full-size update Delta_i, so that they do not depend on the rank each client's factors
are expressed at; with one rank everywhere this equals the ||B_i A_i||_F rule). Rank positions that no
client of the round covers keep their previous global value (plain zero-padding would zero them and leave
those directions untrainable for larger clients). Each client then receives the first r_i rows / columns
(truncation). Task heads are averaged with p_i = n_i / sum n_j.

Self-pruning: a client may add ``lambda * sum_modules ||B[:, g:]||_F ||A[g:, :]||_F`` to its loss
(``prune_penalty``, g = floor(gamma r)), and after local training it drops the trailing ranks, replying at rank
floor(gamma r) (max 1), when the mean of that tail product is

- below the same measure of the adapter it received this round (``prune_rule: received``, the default: the
  paper's rule as its re-implementations state it: the client's trained tail has become smaller than the
  global one it started from);
- below ``prune_threshold`` (``prune_rule: threshold``);
- never (``prune_rule: off``).

The server keeps the smaller rank for that client from then on (and in its checkpoints). The paper publishes
no code; lambda is tuned per task there (fedlora's default 0: no penalty).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from fedlora.adapters.ranks import (
    module_factors,
    profile_of_state,
    rescale_b,
    trailing_rank_norms,
    truncate_state,
)
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.linalg import product_frobenius_norm
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    ServerState,
    StrategyOptions,
    check_example_count,
    check_reply,
    check_same_layout,
    example_weights,
)
from fedlora.strategies.heterogeneous import HeterogeneousRankOptions, HeterogeneousRankStrategy
from fedlora.strategies.registry import register_strategy


class HetLoRAOptions(HeterogeneousRankOptions):
    prune_penalty: float = Field(0.0, ge=0.0, description="lambda of the trailing-rank penalty (0 = off)")
    prune_gamma: float = Field(0.99, gt=0.0, lt=1.0, description="keep floor(gamma r) ranks when pruning")
    prune_rule: Literal["received", "threshold", "off"] = Field(
        "received",
        description="prune when the trained tail is below the received one's (the paper), below "
        "prune_threshold, or never",
    )
    prune_threshold: float | None = Field(
        None, gt=0.0, description="with prune_rule: threshold, prune below this mean trailing norm product"
    )

    @model_validator(mode="after")
    def _threshold_rule_has_a_threshold(self) -> HetLoRAOptions:
        if (self.prune_rule == "threshold") != (self.prune_threshold is not None):
            raise ValueError("prune_rule: threshold goes with prune_threshold (and prune_threshold with it)")
        return self


@register_client_hooks
class TrailingRankPenalty(ClientHooks):
    """HetLoRA's regulariser: lambda * sum_modules ||B[:, g:]||_F ||A[g:, :]||_F on every step, g = floor(gamma r)."""

    kind = "hetlora-penalty"
    penalty: float = Field(gt=0.0)
    gamma: float = Field(0.99, gt=0.0, lt=1.0)

    def extra_loss(self, ctx: ClientContext) -> torch.Tensor | None:
        return self.penalty * trailing_rank_norms(ctx.adapters.trainable_parameters(), self.gamma).sum()

    def dp_refusal(self) -> str | None:
        return "DP-SGD clips per-example gradients and cannot carry HetLoRA's rank penalty"


@register_client_hooks
class SelfPruning(ClientHooks):
    """HetLoRA's self-pruning: after training, reply at the pruned rank floor(gamma r) (B rescaled so s B A
    keeps its leading part) when the mean tail product ||B[:, g:]||_F ||A[g:, :]||_F is below the received
    adapter's (``rule: received``) or below ``threshold`` (``rule: threshold``). No loss term, no phase of its
    own: clients may train batched."""

    kind = "hetlora-pruning"
    batchable: ClassVar[bool] = True
    gamma: float = Field(0.99, gt=0.0, lt=1.0)
    rule: Literal["received", "threshold"] = "received"
    threshold: float | None = None

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        """Measure the tail of the adapter as received (the ``received`` rule compares against it)."""
        if self.rule == "received":
            with torch.no_grad():
                received = float(trailing_rank_norms(list(ctx.adapters.state().items()), self.gamma).mean())
            ctx.scratch["received_trailing_norm"] = received
        return {}

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        with torch.no_grad():
            trailing = float(trailing_rank_norms(list(state.items()), self.gamma).mean())
        metrics["trailing_rank_norm"] = trailing
        limit = self.threshold if self.rule == "threshold" else ctx.scratch["received_trailing_norm"]
        assert limit is not None
        if trailing < limit:
            profile = ctx.adapters.active_profile.pruned(self.gamma)
            state = truncate_state(state, profile, ctx.adapters.scaling)
        return state


@register_strategy
class HetLoRA(HeterogeneousRankStrategy[HetLoRAOptions]):
    """HetLoRA: zero-pad to r_max, sparsity-weighted average, truncate per client; optional self-pruning."""

    name = "hetlora"
    Options: ClassVar[type[StrategyOptions]] = HetLoRAOptions

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        opts = self.options
        hooks = super().client_hooks(state)
        if opts.prune_penalty > 0:
            hooks.append(TrailingRankPenalty(penalty=opts.prune_penalty, gamma=opts.prune_gamma))
        if opts.prune_rule != "off":
            hooks.append(
                SelfPruning(gamma=opts.prune_gamma, rule=opts.prune_rule, threshold=opts.prune_threshold)
            )
        return hooks

    def check(self, state: ServerState, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        """As the default, but with pruning on a reply may also come at the pruned profile floor(gamma r)."""
        reason = check_reply(self.setup, instruction, reply)
        if reason is None or self.options.prune_rule == "off" or check_example_count(self.setup, reply):
            return reason
        pruned = state.profiles[reply.client_id].pruned(self.options.prune_gamma)
        try:
            if profile_of_state(reply.payload) != pruned:
                return reason
        except ValueError:
            return reason
        expected = truncate_state(instruction.payload, pruned, self.setup.scaling)
        return check_same_layout(expected, reply.payload)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        scaling = self.setup.scaling
        current = state.adapter
        out: AdapterState = {}
        for a_key, b_key in module_factors(current).values():
            A_old, B_old = current[a_key], current[b_key]
            r_out, dtype = A_old.shape[0], A_old.dtype
            padded_A, padded_B, norms = [], [], []
            covered = 0
            for reply in replies:
                A = reply.payload[a_key].to(torch.float64)
                B = reply.payload[b_key].to(torch.float64)
                r = A.shape[0]
                covered = max(covered, r)
                norms.append(scaling(r) * float(product_frobenius_norm(B, A)))
                pA = torch.zeros(A_old.shape, dtype=torch.float64)
                pB = torch.zeros(B_old.shape, dtype=torch.float64)
                pA[:r] = A
                pB[:, :r] = rescale_b(B, scaling, r, r_out)
                padded_A.append(pA)
                padded_B.append(pB)
            total = sum(norms)
            weights = [n / total for n in norms] if total > 0 else example_weights(replies)
            A_new = sum(w * a for w, a in zip(weights, padded_A, strict=True))
            B_new = sum(w * b for w, b in zip(weights, padded_B, strict=True))
            assert isinstance(A_new, torch.Tensor) and isinstance(B_new, torch.Tensor)
            A_new[covered:] = A_old[covered:].to(torch.float64)
            B_new[:, covered:] = B_old[:, covered:].to(torch.float64)
            out[a_key], out[b_key] = A_new.to(dtype), B_new.to(dtype)
        self.average_extra_tensors(state, replies, out)
        # self-pruned clients keep their smaller rank
        pruned = {reply.client_id: profile_of_state(reply.payload) for reply in replies}
        return state.evolve({GLOBAL: {k: out[k] for k in current}}, profiles=pruned)
