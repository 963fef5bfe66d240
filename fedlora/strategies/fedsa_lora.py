"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep each client's B private on the client.

Both factors train on the client; only the A factors (and any task head) are sent and averaged:

    A = sum_i p_i A_i,    p_i = n_i / sum_j n_j        (heads likewise)

B_i never leaves client i: it is kept in the client's personal store (``RUN_DIR/personal/`` in simulation,
the node's own folder under Flower) and loaded over the payload the next time the client is sampled (a new
client starts from PEFT's B = 0). The A factors learn what is general across clients, the B factors what is
client-specific, so the model a client uses is W0 + (alpha / r) B_i A.

What travels: A (and heads) both ways, about half of FedIT's bytes on square modules. The server holds no B,
so the global adapter it evaluates and exports is A with B = 0 (the base model's outputs); the figure that
means something is personalised: each client reports ``personal_eval_loss``, the loss of its own
W0 + s B_i A_global on its eval split, measured when the round starts (before local training). Needs one rank
for every client.

Differences from the reference code (FederatedScope-based, GLUE): task heads are averaged here with A; the
personalised figure is fedlora's.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.eval.loss import evaluate_loss
from fedlora.strategies.base import ClientInstruction, ServerSetup, StrategyOptions
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy

STORE_NAME = "fedsa-private"


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


@register_client_hooks
class PrivateB(ClientHooks):
    """FedSA-LoRA's client side: B (and, unless shared, heads) stays home, in the personal store."""

    kind = "fedsa-lora"
    partial_payload = True

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        """Put the client's own B back (B = 0 the first time), then measure the personalised model."""
        if ctx.store is None:
            raise ValueError(
                "fedsa-lora keeps each client's B on the client: this client has no personal store"
            )
        current = ctx.adapters.state()
        own = ctx.store.load(ctx.client_id, STORE_NAME, ctx.server_round)
        if own is None:
            own = {k: torch.zeros_like(v) for k, v in current.items() if is_lora_b(k)}
        ctx.adapters.load({**current, **own})
        metrics: dict[str, float] = {}
        if ctx.data is not None and ctx.data.size("eval") > 0:
            figures = evaluate_loss(
                ctx.adapters.model, ctx.encoder, [ctx.data], "eval", ctx.settings.batch_size
            )
            metrics["personal_eval_loss"] = figures["eval_loss"]
        return metrics

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        """Keep B for the client's next round; send A (and heads)."""
        assert ctx.store is not None
        ctx.store.save(
            ctx.client_id, STORE_NAME, ctx.server_round, {k: v for k, v in state.items() if is_lora_b(k)}
        )
        return {k: v for k, v in state.items() if not is_lora_b(k)}


@register_strategy
class FedSALoRA(FactorAverage[StrategyOptions]):
    """FedSA-LoRA: A (and heads) averaged with example weights; each client's B private."""

    name = "fedsa-lora"
    default_optimizer = "adamw"

    def initialize(self, setup: ServerSetup) -> None:
        super().initialize(setup)  # refuses heterogeneous ranks
        self.order = list(self.global_state)  # PEFT's key order, for the evaluated and exported adapter
        self._b_shapes = {k: (v.shape, v.dtype) for k, v in self.global_state.items() if is_lora_b(k)}
        self.global_state = {k: v for k, v in self.global_state.items() if not is_lora_b(k)}

    def client_hooks(self) -> list[ClientHooks]:
        return [PrivateB()]

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        hooks = self.client_hooks()
        return {cid: ClientInstruction(self.global_state, hooks=hooks) for cid in client_ids}

    def evaluation_state(self) -> AdapterState:
        """The server holds no B: the shared A (and heads) with B = 0, in PEFT's key order."""
        shapes = self._b_shapes  # B's shapes and dtypes, from the initial adapter
        full = {
            **{k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in shapes.items()},
            **self.global_state,
        }
        return {k: full[k] for k in self.order}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.evaluation_state().items()}

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.order = list(tensors)
        self._b_shapes = {k: (v.shape, v.dtype) for k, v in tensors.items() if is_lora_b(k)}
        self.global_state = {k: v.clone() for k, v in tensors.items() if not is_lora_b(k)}
