"""FedIT, FedAvg and FedProx: weighted averaging of the LoRA factors, A and B separately.

    A_global = sum_i p_i A_i,    B_global = sum_i p_i B_i,    p_i = n_i / sum_j n_j

(over the clients whose replies were accepted this round). Needs one rank everywhere. The three differ
only in local training: FedIT uses AdamW, FedAvg SGD, FedProx SGD plus mu/2 ||theta - theta_global||^2
over the whole adapter vector. Note: mean(B) mean(A) != mean(B A); FlexLoRA fixes that bias.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from fedlora.client.frozen import FreezeFactor
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.errors import ConfigError
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    OptionsT,
    ServerSetup,
    ServerState,
    Strategy,
    StrategyOptions,
    example_weights,
    weighted_average,
)
from fedlora.strategies.registry import register_strategy


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor], mu: float) -> torch.Tensor:
    """mu / 2 * ||theta - theta_global||_2^2 with theta the concatenation of all tensors (one vector)."""
    diff = torch.cat([(p - a).reshape(-1) for p, a in zip(params, anchor, strict=True)])
    return 0.5 * mu * diff.pow(2).sum()


@register_client_hooks
class ProximalTerm(ClientHooks):
    """FedProx's client side: add mu / 2 ||theta - theta_global||^2 (theta: the whole trainable adapter as one
    vector, theta_global: what the round started from) to every step's loss."""

    kind = "fedprox"
    mu: float = Field(0.01, ge=0.0)

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        ctx.scratch["prox_anchor"] = [p.detach().clone() for _, p in ctx.trainable]
        return {}

    def extra_loss(self, ctx: ClientContext) -> torch.Tensor | None:
        if self.mu == 0:
            return None
        return proximal_term([p for _, p in ctx.trainable], ctx.scratch["prox_anchor"], self.mu)

    def dp_refusal(self) -> str | None:
        if self.mu > 0:
            return "DP-SGD clips per-example gradients and cannot carry FedProx's proximal term"
        return None


def require_one_rank(strategy_name: str, setup: ServerSetup) -> None:
    """ConfigError unless every client has the same rank profile (methods that average A and B apart)."""
    profiles = sorted({p.name for p in setup.client_profiles.values()})
    if len(profiles) > 1:
        raise ConfigError(
            f"strategy {strategy_name} averages A and B separately and needs one rank for every client, but "
            f"resources give {', '.join(profiles)}: use flexlora, hetlora or flora, or set resources.force to min "
            "or max"
        )


class FactorAverage(Strategy[OptionsT]):
    """Average each adapter tensor with example weights (every client must have the same rank profile)."""

    linear_aggregate = True

    def initialize(self, setup: ServerSetup) -> ServerState:
        require_one_rank(self.name, setup)
        return super().initialize(setup)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        averaged = weighted_average([r.payload for r in replies], example_weights(replies))
        return state.evolve({GLOBAL: averaged})


@register_strategy
class FedIT(FactorAverage[StrategyOptions]):
    """FedIT (Zhang et al., 2024): federated instruction tuning, FedAvg of LoRA factors, AdamW locally."""

    name = "fedit"
    supports_dora = True  # every payload tensor is averaged alike, DoRA's magnitude vectors included
    default_optimizer = "adamw"


@register_strategy
class FedAvg(FactorAverage[StrategyOptions]):
    """FedAvg (McMahan et al., 2017) on the LoRA factors with local SGD."""

    name = "fedavg"
    supports_dora = True  # every payload tensor is averaged alike, DoRA's magnitude vectors included
    default_optimizer = "sgd"


class FedProxOptions(StrategyOptions):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term mu/2 ||theta - theta_global||^2")


@register_strategy
class FedProx(FactorAverage[FedProxOptions]):
    """FedProx (Li et al., 2020): local SGD on L(theta) + mu/2 ||theta - theta_global||^2, then FedAvg."""

    name = "fedprox"
    supports_dora = True  # every payload tensor is averaged alike, DoRA's magnitude vectors included
    default_optimizer = "sgd"
    Options: ClassVar[type[StrategyOptions]] = FedProxOptions

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return [ProximalTerm(mu=self.options.mu)]


class OneFactorAverage(FactorAverage[OptionsT]):
    """Clients receive the whole adapter, train one factor (``trained_factor`` of the round) with the other
    frozen, and send that factor only; the server averages it with example weights. Exact for the product,
    since the frozen factor is common: sum_i p_i s B_i A = s (sum_i p_i B_i) A (and likewise for A)."""

    linear_aggregate = False  # a robust rule over half the adapter would drop the other half

    def trained_factor(self, server_round: int) -> str:
        """``"A"`` or ``"B"``: the factor the clients train and send in ``server_round``."""
        return "B"

    def frozen_heads(self) -> bool:
        """Whether a task head is frozen (neither trained nor sent) too (default: it trains)."""
        return False

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        frozen = "A" if self.trained_factor(server_round) == "B" else "B"
        hooks: list[ClientHooks] = [FreezeFactor(factor=frozen, freeze_heads=self.frozen_heads())]
        payload = state.adapter
        return {cid: ClientInstruction(payload, hooks=hooks) for cid in client_ids}

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        trained = weighted_average([r.payload for r in replies], example_weights(replies))
        return state.evolve({GLOBAL: {k: trained.get(k, v) for k, v in state.adapter.items()}})
