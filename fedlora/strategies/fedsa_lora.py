"""FedSA-LoRA (Guo et al., ICLR 2025): share A, keep each client's B private on the client.

Both factors train on the client; only the A factors are sent and averaged:

    A = sum_i p_i A_i,    p_i = n_i / sum_j n_j

A task head (a classifier) stays on its client too (``head: local``, the default and the reference's
``personalization.local_param: ['lora_B', 'classifier']`` in its FederatedScope configs), or is averaged with A
(``head: shared``). B_i never leaves client i: it is kept in the client's personal store (``RUN_DIR/personal/`` in simulation,
the node's own folder under Flower) and loaded over the payload the next time the client is sampled (a new
client starts from PEFT's B = 0). The A factors learn what is general across clients, the B factors what is
client-specific, so the model a client uses is W0 + (alpha / r) B_i A.

What travels: A (and heads) both ways, about half of FedIT's bytes on square modules. The server holds no B,
so the global adapter it evaluates and exports is A with B = 0 (the base model's outputs); the figure that
means something is personalised: each client reports ``personal_eval_loss``, the loss of its own
W0 + s B_i A_global on its eval split, measured when the round starts (before local training). Needs one rank
for every client. With a local head the server's evaluated and exported adapter carries the initial head.

Differences from the reference code (FederatedScope-based, GLUE): the personalised figure is fedlora's.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.eval.loss import evaluate_loss
from fedlora.strategies.base import GLOBAL, ServerSetup, ServerState, StrategyOptions
from fedlora.strategies.fedavg import FactorAverage
from fedlora.strategies.registry import register_strategy

STORE_NAME = "fedsa-private"
#: the state's group of what stays on the clients, at its initial value (B = 0, the seeded head)
HELD = "held"


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def is_private(key: str, local_head: bool) -> bool:
    """What stays on the client: every B, and (``local_head``) every tensor that is not a LoRA factor."""
    return is_lora_b(key) or (local_head and ".lora_" not in key)


class FedSALoRAOptions(StrategyOptions):
    head: Literal["local", "shared"] = Field(
        "local", description="local: a task head stays on its client, as B (the reference); shared: averaged"
    )


@register_client_hooks
class PrivateB(ClientHooks):
    """FedSA-LoRA's client side: B (and, with ``local_head``, a task head) stays home, in the personal store."""

    kind = "fedsa-lora"
    partial_payload = True
    local_head: bool = False

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        """Put the client's own B (and head) back (the seeded initial ones the first time: B = 0), then
        measure the personalised model."""
        if ctx.store is None:
            raise ValueError(
                "fedsa-lora keeps each client's B on the client: this client has no personal store"
            )
        current = ctx.adapters.state()
        own = ctx.store.load(ctx.client_id, STORE_NAME, ctx.server_round)
        if own is None:
            initial = ctx.adapters.initial_state(ctx.adapters.active_profile)
            own = {k: v.clone() for k, v in initial.items() if is_private(k, self.local_head)}
        ctx.adapters.load({**current, **own})
        metrics: dict[str, float] = {}
        model = ctx.adapters.model
        if ctx.data is not None and ctx.data.size("eval") > 0 and model is not None:
            figures = evaluate_loss(model, ctx.encoder, [ctx.data], "eval", ctx.settings.batch_size)
            metrics["personal_eval_loss"] = figures["eval_loss"]
        return metrics

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        """Keep B (and a local head) for the client's next round; send the rest."""
        assert ctx.store is not None
        private = {k: v for k, v in state.items() if is_private(k, self.local_head)}
        ctx.store.save(ctx.client_id, STORE_NAME, ctx.server_round, private)
        return {k: v for k, v in state.items() if k not in private}


@register_strategy
class FedSALoRA(FactorAverage[FedSALoRAOptions]):
    """FedSA-LoRA: A averaged with example weights; each client's B (and, by default, head) private."""

    name = "fedsa-lora"
    default_optimizer = "adamw"
    Options: ClassVar[type[StrategyOptions]] = FedSALoRAOptions

    @property
    def local_head(self) -> bool:
        return self.options.head == "local"

    def initialize(self, setup: ServerSetup) -> ServerState:
        """What travels is the ``global`` group; what stays on the clients is kept only as its initial value
        (B = 0, the seeded head), group ``held``, for the evaluated and exported adapter."""
        state = super().initialize(setup)  # refuses heterogeneous ranks
        full = state.adapter
        private = {k for k in full if is_private(k, self.local_head)}
        return state.evolve(
            {
                GLOBAL: {k: v for k, v in full.items() if k not in private},
                HELD: {k: v for k, v in full.items() if k in private},
            },
            {"key_order": list(full)},
        )

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return [PrivateB(local_head=self.local_head)]

    def evaluation_state(self, state: ServerState) -> AdapterState:
        """The server holds no B (nor a local head): the shared A with B = 0 (and the initial head)."""
        full = {**state.group(HELD), **state.adapter}
        return {k: full[k] for k in state.facts["key_order"]}
