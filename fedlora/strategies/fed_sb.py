"""Fed-SB (Singhal et al., 2025): LoRA-SB on every client, only an r x r matrix trained and averaged.

Per target module the update is s B R A with B (d x r) and A (r x k) frozen for the whole run and R (r x r)
trained, s = 1 (``scale: reference``: the reference scripts set ``lora_alpha = lora_r``, e.g.
``fed_sb/fed/ARITHMETIC/train_it_fed.py`` of the Fed-SB code) or the adapter's alpha / r (``scale: adapter``). B and A come from the truncated SVD of the pretrained weight, W0 = U S V^T:

    B = U[:, :r],   A = S[:r] V[:, :r]^T,   R_0 ~ N(0, sigma^2)   (sigma = ``options.init_std``)

(the weight-based initialisation of the reference code; a seeded R_0 near 0, so the model starts at ~W0).
Each round the clients train R (a bias-free r x r linear layer put between PEFT's lora_A and lora_B) and
send only R; the server averages it,

    R <- sum_i w_i R_i,      exact: sum_i w_i s B R_i A = s B (sum_i w_i R_i) A,

with w_i = 1 / K (``weighting: uniform``, the reference's ``aggregate_models_fed_sb``, ``fed_sb/fed/fed_agg.py``:
``torch.stack(...).mean(0)``) or n_i / sum_j n_j (``weighting: examples``),

so a client's upload is r^2 numbers per module, whatever d and k. DP-SGD clips and noises R only (it is an
ordinary linear layer for Opacus). The exported adapter is plain PEFT LoRA: (A, B R) at rank r.

What travels down: A, B and R (fedlora's simulated clients keep nothing between rounds; a deployment whose
clients kept A and B after their first round would download R alone). Needs one rank for every client.

Differences from the paper's code: its default initialisation is from the SVD of a full-gradient estimate on
training data (LoRA-SB); fedlora uses the weight-SVD variant the same code provides, because the gradient
would need private client data on the server.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.ranks import RankProfile, lora_key_parts, module_factors
from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.config.schema import AdapterConfig
from fedlora.strategies.base import (
    GLOBAL,
    ClientReply,
    ReplyWeighting,
    ServerSetup,
    ServerState,
    Strategy,
    StrategyOptions,
    reply_weights,
    weighted_average,
)
from fedlora.strategies.fedavg import require_one_rank
from fedlora.strategies.registry import register_strategy

LATENT = ".lora_R.weight"


def latent_key(module: str) -> str:
    """The state key of ``module``'s r x r matrix R."""
    return module + LATENT


def latents(state: AdapterState) -> AdapterState:
    return {k: v for k, v in state.items() if k.endswith(LATENT)}


def merged_adapter(state: AdapterState) -> AdapterState:
    """A plain PEFT LoRA state from (A, B, R): A and B R (same rank, same scale)."""
    out = {k: v for k, v in state.items() if not k.endswith(LATENT)}
    for module, (_, b_key) in module_factors(out).items():
        out[b_key] = (state[b_key].double() @ state[latent_key(module)].double()).to(state[b_key].dtype)
    return out


class _Latent(torch.nn.Sequential):
    """lora_B[slot] replaced by (R, B): PEFT's forward then computes B(R(A x)) * s."""


@register_client_hooks
class TrainLatent(ClientHooks):
    """Keep lora_A and lora_B frozen and unsent; train and send an r x r matrix R between them."""

    kind = "fed-sb-latent"

    def frozen(self, key: str) -> bool:
        return lora_key_parts(key) is not None

    def start_state(self, ctx: ClientContext, payload: AdapterState) -> AdapterState:
        ctx.scratch["latent"] = latents(payload)
        return {k: v for k, v in payload.items() if not k.endswith(LATENT)}

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        adapters = ctx.adapters
        restore(adapters)
        slot = adapters.active_slot_name
        trained = []
        for module, (layer, _, _) in adapters.lora_modules().items():
            R = ctx.scratch["latent"][latent_key(module)]
            B = layer.lora_B[slot]
            linear = torch.nn.Linear(R.shape[1], R.shape[0], bias=False, device=B.weight.device)
            with torch.no_grad():
                linear.weight.copy_(R)
            layer.lora_B[slot] = _Latent(linear, B)
            trained.append((latent_key(module), linear.weight))
        ctx.trainable = trained + [(k, p) for k, p in ctx.trainable if lora_key_parts(k) is None]
        return {}

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        reply = {k: v.detach().to("cpu").clone() for k, v in ctx.trainable if k.endswith(LATENT)}
        restore(ctx.adapters)
        return {**state, **reply}


def restore(adapters: LoraAdapters) -> None:
    """Put every lora_B back where a :class:`TrainLatent` round replaced it (idempotent)."""
    if adapters.model is None:
        return
    for layer, _, _ in adapters.lora_modules().values():  # every slot lives on these same LoRA layers
        for name, entry in list(layer.lora_B.items()):
            if isinstance(entry, _Latent):
                layer.lora_B[name] = entry[1]


class FedSBOptions(StrategyOptions):
    init_std: float = Field(1e-5, ge=0.0, description="standard deviation of the initial R (seeded)")
    scale: Literal["reference", "adapter"] = Field(
        "reference",
        description="reference: s = 1 (lora_alpha = r, the reference scripts); adapter: alpha / r",
    )
    weighting: ReplyWeighting = Field(
        "uniform", description="uniform: R = mean of the R_i (the reference); examples: n_i / sum n_j"
    )


@register_strategy
class FedSB(Strategy[FedSBOptions]):
    """Fed-SB: frozen SVD factors, a trained r x r core per module, exact averaging of the cores."""

    name = "fed-sb"
    default_optimizer = "adamw"
    Options: ClassVar[type[StrategyOptions]] = FedSBOptions

    def initial_adapter(self, adapters: LoraAdapters, profile: RankProfile) -> AdapterState:
        """B = U_r, A = S_r V_r^T of each target module's pretrained weight (float64 SVD on the CPU), R_0 seeded."""
        state = adapters.initial_state(profile)
        weights = adapters.base_weights()
        gen = torch.Generator().manual_seed(adapters.cfg.init_seed)
        std = self.options.init_std
        for module, (a_key, b_key) in module_factors(state).items():
            r = state[a_key].shape[0]
            U, S, Vh = torch.linalg.svd(
                weights[module].detach().to("cpu", torch.float64), full_matrices=False
            )
            state[b_key] = U[:, :r].to(state[b_key].dtype).contiguous()
            state[a_key] = (S[:r, None] * Vh[:r]).to(state[a_key].dtype).contiguous()
            state[latent_key(module)] = (torch.randn(r, r, generator=gen, dtype=torch.float64) * std).float()
        return state

    @classmethod
    def adapter_config(cls, adapter: AdapterConfig, options: FedSBOptions) -> AdapterConfig:
        """s = 1 at every rank under ``scale: reference`` (unless ``adapter.scale`` is set)."""
        if options.scale == "reference" and adapter.scale is None and not adapter.use_rslora:
            return adapter.model_copy(update={"scale": 1.0})
        return adapter

    def initialize(self, setup: ServerSetup) -> ServerState:
        require_one_rank(self.name, setup)
        return super().initialize(setup)

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return [TrainLatent()]

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        averaged = weighted_average(
            [r.payload for r in replies], reply_weights(replies, self.options.weighting)
        )
        return state.evolve({GLOBAL: {**state.adapter, **averaged}})

    def evaluation_state(self, state: ServerState) -> AdapterState:
        return merged_adapter(state.adapter)
