"""FedIT, FedAvg and FedProx: weighted averaging of the LoRA factors, A and B separately.

    A_global = sum_i p_i A_i,    B_global = sum_i p_i B_i,    p_i = n_i / sum_j n_j

(over the clients whose replies were accepted this round). Needs one rank everywhere. The three differ
only in local training: FedIT uses AdamW, FedAvg SGD, FedProx SGD plus mu/2 ||theta - theta_global||^2
over the whole adapter vector. Note: mean(B) mean(A) != mean(B A); FlexLoRA fixes that bias.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig
from fedlora.strategies.base import (
    ClientInstruction,
    ClientReply,
    ServerSetup,
    Strategy,
    StrategyOptions,
    example_weights,
    proximal_penalty_refusal,
    weighted_average,
)


class FactorAverage(Strategy):
    """Average each adapter tensor with example weights (every client must have the same rank profile)."""

    def initialize(self, setup: ServerSetup) -> None:
        profiles = sorted({p.name for p in setup.client_profiles.values()})
        if len(profiles) > 1:
            raise ConfigError(
                f"strategy {self.name} averages A and B separately and needs one rank for every client, but "
                f"resources give {', '.join(profiles)}: use flexlora or hetlora, or set resources.force to min or max"
            )
        super().initialize(setup)

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        self.global_state = weighted_average([r.payload for r in replies], example_weights(replies))
        return self.global_state


class FedIT(FactorAverage):
    """FedIT (Zhang et al., 2024): federated instruction tuning, FedAvg of LoRA factors, AdamW locally."""

    name = "fedit"
    default_optimizer = "adamw"


class FedAvg(FactorAverage):
    """FedAvg (McMahan et al., 2017) on the LoRA factors with local SGD."""

    name = "fedavg"
    default_optimizer = "sgd"


class FedProxOptions(StrategyOptions):
    mu: float = Field(0.01, ge=0.0, description="weight of the proximal term mu/2 ||theta - theta_global||^2")


class FedProx(FactorAverage):
    """FedProx (Li et al., 2020): local SGD on L(theta) + mu/2 ||theta - theta_global||^2, then FedAvg."""

    name = "fedprox"
    default_optimizer = "sgd"
    Options: ClassVar[type[StrategyOptions]] = FedProxOptions

    @classmethod
    def refusal(cls, cfg: ExperimentConfig, options: StrategyOptions) -> str | None:
        return proximal_penalty_refusal(cfg, True) or super().refusal(cfg, options)

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        mu = self.options.mu  # type: ignore[attr-defined]
        return {cid: ClientInstruction(self.global_state, {"prox_mu": mu}) for cid in client_ids}
