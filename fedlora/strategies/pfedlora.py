"""pFedLoRA (Yi et al., 2023): model-heterogeneous personalised FL through one small shared adapter.

Every client runs its own local model (architectures differ; see :mod:`fedlora.engine.personal` for where the
shared adapter attaches) and one low-rank adapter whose shape is the same everywhere. Each round, on the
client, the iterative global-local knowledge exchange:

1. load the global adapter and freeze it; train the local model's own weights for ``local_model_steps``
   (global knowledge flows into the local model);
2. freeze the local model; train the adapter for ``client.local_steps`` (local knowledge flows into it);

then send only the adapter. Server: A = sum p_i A_i, B = sum p_i B_i, p_i = n_i / sum n_j. Evaluation is
personalised: each client's local model with the adapter, on its own data.

``federate: false`` is the standalone baseline: the same local training, nothing is sent or averaged, each
client keeps its own adapter (and no bytes are counted). ``share: model`` is the whole-model FedAvg
baseline for a homogeneous federation: the local model's weights travel and are averaged with the adapter.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.state import AdapterState, clone_state
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.client.loss import batch_loss
from fedlora.client.steps import run_steps, training
from fedlora.compute import to_cpu
from fedlora.data.encoding import batches_for_steps
from fedlora.strategies.base import (
    ClientInstruction,
    ClientReply,
    ExperimentFacts,
    ServerState,
    StrategyOptions,
)

if TYPE_CHECKING:
    from fedlora.models.personal import ClientModels
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy


def own_group(client_id: int) -> str:
    """The state's group of a standalone client's own adapter."""
    return f"own-{client_id}"


class PFedLoRAOptions(StrategyOptions):
    local_model_steps: int = Field(5, ge=0, description="phase 1 steps on the local model (adapter frozen)")
    local_model_lr: float | None = Field(None, gt=0.0, description="phase 1 learning rate (None = client.lr)")
    federate: bool = Field(True, description="false: standalone local training, nothing shared")
    share: Literal["adapter", "model"] = Field(
        "adapter", description="model: the whole-model FedAvg baseline (one architecture only)"
    )


@register_client_hooks
class LocalModelPhase(ClientHooks):
    """pFedLoRA's client side. Phase 1 (before the adapter's steps): the adapter frozen, the local model's own
    weights trained with AdamW for ``steps`` steps; then frozen again for phase 2 (the generic trainer's
    steps on the adapter). With ``share_model`` the local weights travel with the adapter (the whole-model
    FedAvg baseline)."""

    kind = "pfedlora"
    steps: int = Field(5, ge=0)
    lr: float | None = Field(None, gt=0.0)
    share_model: bool = False

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        if self.steps == 0:
            return {}
        adapters, settings = ctx.adapters, ctx.settings
        model = adapters.model
        assert model is not None
        adapter_params = [p for _, p in adapters.trainable_parameters()]
        local = [p for _, p in adapters.base_parameters()]
        batches = batches_for_steps(ctx.encoded, settings.batch_size, self.steps, ctx.generator)
        started = time.perf_counter()
        with training(local, adapter_params):
            optimizer = torch.optim.AdamW(
                local, lr=self.lr or settings.lr, weight_decay=settings.weight_decay
            )
            task = ctx.encoder.task
            losses, _, _ = run_steps(
                model,
                local,
                batches,
                optimizer,
                lambda batch: batch_loss(model, batch, task),
                settings.grad_clip,
                ctx.seed ^ 0x10CA1,
                ctx.encoder.training_batch,
                settings.precision,
            )
        return {
            "local_model_loss": sum(losses) / len(losses),
            "local_model_seconds": time.perf_counter() - started,
        }

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        if self.share_model:
            state = {**state, **to_cpu(dict(ctx.adapters.base_parameters()))}
        return state

    def dp_refusal(self) -> str | None:
        if self.steps > 0 or self.share_model:
            return "phase 1 trains the local model on the private examples outside DP-SGD"
        return None


@register_strategy
class PFedLoRA(FactorAverage[PFedLoRAOptions]):
    """pFedLoRA: alternating local-model / adapter training; FedAvg of the homogeneous adapter."""

    name = "pfedlora"
    default_optimizer = "adamw"
    personal_models = True
    Options: ClassVar[type[StrategyOptions]] = PFedLoRAOptions
    conformance_overrides: ClassVar[dict[str, object]] = {
        "model.tiny_num_layers": 3,
        "model.variants": "[{num_layers: 3}, {num_layers: 2}]",
        "adapter.target_modules": "[q_proj, v_proj]",
        "strategy.options": "{local_model_steps: 1}",
    }

    def __init__(self, options: PFedLoRAOptions | None = None) -> None:
        super().__init__(options)
        self.communicates = self.options.federate
        self.shares_local_model = self.options.share == "model"

    @classmethod
    def refusal(cls, facts: ExperimentFacts, options: PFedLoRAOptions) -> str | None:
        if options.share == "model" and facts.num_variants != 1:
            return "strategy.options.share 'model' needs one architecture (one model.variants entry)"
        return super().refusal(facts, options)

    def initial_personal_state(self, client_models: ClientModels) -> AdapterState:
        """The shared adapter; with ``share: model`` the one architecture's weights too (they travel)."""
        state = client_models.initial_shared_state()
        if self.shares_local_model:
            state.update(client_models.to_shared(to_cpu(dict(client_models.adapters[0].base_parameters()))))
        return state

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        opts = self.options
        return [
            LocalModelPhase(
                steps=opts.local_model_steps,
                lr=opts.local_model_lr,
                share_model=self.shares_local_model,
            )
        ]

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        hooks = self.client_hooks(state)
        return {c: ClientInstruction(self.personal_state(state, c), hooks=hooks) for c in client_ids}

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        if self.options.federate:
            return super().aggregate(state, server_round, replies)
        return state.evolve({own_group(r.client_id): clone_state(r.payload) for r in replies})

    def personal_state(self, state: ServerState, client_id: int) -> AdapterState:
        """Federated: the global adapter; standalone: the client's own adapter (the global one before it has
        trained)."""
        if self.options.federate:
            return state.adapter
        return state.group(own_group(client_id)) or state.adapter
