"""What FlexLoRA and HetLoRA share: a global adapter at the federation's largest rank profile (r_max per
module kind), each client served its own truncation of it, first-order local training chosen by option.

Truncation to rank r keeps the first r rows of A and the first r columns of B, with B rescaled by
s_rmax / s_r (s_r = alpha / r), so ``s_r B_r A_r`` is exactly the leading part of ``s_rmax B A``
(:func:`fedlora.adapters.ranks.truncate_state`).
"""

from __future__ import annotations

from typing import ClassVar, Literal, TypeVar

from pydantic import Field

from fedlora.adapters.ranks import RankProfile, lora_key_parts, truncate_state
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks
from fedlora.strategies.base import (
    ClientInstruction,
    ClientReply,
    ServerState,
    Strategy,
    StrategyOptions,
    example_weights,
    weighted_average,
)
from fedlora.strategies.fedavg import ProximalTerm
from fedlora.strategies.registry import strategy_class


class HeterogeneousRankOptions(StrategyOptions):
    local: Literal["fedit", "fedavg", "fedprox"] = Field(
        "fedit", description="local training: fedit (AdamW), fedavg (SGD), fedprox (SGD + proximal term)"
    )
    mu: float = Field(0.01, ge=0.0, description="FedProx mu (only with local: fedprox)")


HetOptionsT = TypeVar("HetOptionsT", bound=HeterogeneousRankOptions)


class HeterogeneousRankStrategy(Strategy[HetOptionsT]):
    """Shared by FlexLoRA and HetLoRA: a global adapter at r_max, each client served its own truncation."""

    Options: ClassVar[type[StrategyOptions]] = HeterogeneousRankOptions

    def __init__(self, options: HetOptionsT | None = None) -> None:
        super().__init__(options)
        # local training is that of the named method (registered in fedavg.py): its optimizer too
        local = strategy_class(self.options.local).default_optimizer
        self.default_optimizer = local  # type: ignore[misc]  # a class fact, here set by the options

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        """FedProx's term with ``local: fedprox``; nothing else (subclasses add theirs)."""
        opts = self.options
        return [ProximalTerm(mu=opts.mu)] if opts.local == "fedprox" else []

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        """Each client: the global adapter truncated to its own profile (one payload per distinct profile)."""
        payloads: dict[RankProfile, AdapterState] = {}
        out = {}
        hooks = self.client_hooks(state)
        for cid in client_ids:
            profile = state.profiles[cid]
            if profile not in payloads:
                payloads[profile] = truncate_state(state.adapter, profile, self.setup.scaling)
            out[cid] = ClientInstruction(payloads[profile], hooks=hooks)
        return out

    def average_extra_tensors(
        self, state: ServerState, replies: list[ClientReply], out: AdapterState
    ) -> None:
        """Tensors that are not LoRA factors (task heads) are averaged with p_i."""
        extra = [k for k in state.adapter if lora_key_parts(k) is None]
        if extra:
            states = [{k: r.payload[k] for k in extra} for r in replies]
            out.update(weighted_average(states, example_weights(replies)))
