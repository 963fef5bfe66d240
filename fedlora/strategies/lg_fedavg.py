"""LG-FedAvg (Liang et al., 2020, "Think Locally, Act Globally"): local representations, one global head.

A model-heterogeneous baseline for pFedLoRA (``model.variants`` with ``model.shared_adapter: representation``):
each client trains its own model end to end (its encoder, its projection P into the common ``shared_dim``-wide
space and the classifier C on it), and only C (num_labels x shared_dim, and its bias) travels. Server:
C = (1 / K) sum_i C_i over the round's K clients (``weighting: uniform``, the reference: ``main_lg.py`` of
pliang279/LG-FedAvg divides the summed global layers by the number of sampled users), or
C = sum_i p_i C_i, p_i = n_i / sum_j n_j (``weighting: examples``). The shared LoRA adapter of the representation head is not used
(B stays 0). With clients of different widths the head is the only part of the model they can share, which is
why it sits on the common space.

Client side (:class:`TrainOwnModel`): the generic trainer's ``client.local_steps`` steps train every weight of
the client's own model (the adapter frozen), with ``client.optimizer`` at ``client.lr``; the client's weights
stay on it between rounds (``personal/``), the global head is loaded over its own at the start of a round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.compute import to_cpu
from fedlora.models.personal import head_part
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    ExperimentFacts,
    OptionsT,
    ReplyWeighting,
    ServerState,
    Strategy,
    StrategyOptions,
    reply_weights,
    weighted_average,
)
from fedlora.strategies.registry import register_strategy

if TYPE_CHECKING:
    from fedlora.models.personal import ClientModels

#: the global head's tensors on the wire (the representation head's classifier, see fedlora.models.personal)
HEAD_PREFIX = "shared.classifier."


def representation_refusal(facts: ExperimentFacts, name: str) -> str | None:
    """Why ``name`` (a baseline that works on the common representation space) cannot run on ``cfg``."""
    if not facts.num_variants or facts.shared_adapter != "representation":
        return (
            f"strategy {name} shares what sits on the common representation space: give model.variants and "
            "model.shared_adapter: representation (model.task: classification)"
        )
    return None


@register_client_hooks
class TrainOwnModel(ClientHooks):
    """The trainer's steps train the client's own model weights (every weight outside the LoRA adapter), not
    the adapter; the reply holds the representation head's tensors whose names inside the head start with one
    of ``send`` (e.g. ``classifier.``), nothing of the adapter."""

    kind = "own-model"
    partial_payload: ClassVar[bool] = True
    send: tuple[str, ...] = ()

    def frozen(self, key: str) -> bool:
        return ".lora_" in key  # the adapter is neither trained nor sent

    def start_state(self, ctx: ClientContext, payload: AdapterState) -> AdapterState:
        return ctx.adapters.initial_state()  # the unused adapter at B = 0 (its payload part is empty)

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        own = ctx.adapters.base_parameters()
        for _, param in own:
            param.requires_grad_(True)
        ctx.trainable = list(own)
        return {}

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        own = ctx.adapters.base_parameters()
        for _, param in own:
            param.requires_grad_(False)
        sent = {k: p for k, p in own if any(head_part(k).startswith(s) for s in self.send)}
        return {**state, **to_cpu(sent)}

    def dp_refusal(self) -> str | None:
        return "the client's own model trains on the private examples outside DP-SGD's adapter accounting"


class OwnModelBaseline(Strategy[OptionsT]):
    """Base of the model-heterogeneous baselines on the common representation space: every client trains its
    own model end to end (:class:`TrainOwnModel`); each round's payload is :meth:`shared_part` (what the
    method shares), and the global state also keeps the unused shared adapter (B = 0) for evaluation."""

    default_optimizer = "adamw"
    personal_models = True
    conformance_overrides: ClassVar[dict[str, object]] = {  # two widths on the common representation space
        "model.task": "classification",
        "data.source": "bbc-news",
        "data.max_seq_len": 32,
        "partition.method": "iid",
        "data.max_train_examples_per_client": 16,
        "data.max_eval_examples_per_client": 8,
        "federation.num_clients": 4,
        "model.shared_adapter": "representation",
        "model.shared_dim": 16,
        "model.variants": "[{tiny_hidden_size: 64}, {tiny_hidden_size: 32}]",
    }

    @classmethod
    def refusal(cls, facts: ExperimentFacts, options: OptionsT) -> str | None:
        return representation_refusal(facts, cls.name) or super().refusal(facts, options)

    def shared_part(self, state: ServerState) -> AdapterState:
        """What travels to the clients (default: the whole global adapter)."""
        return state.adapter

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        hooks = self.client_hooks(state)
        payload = self.shared_part(state)
        return {c: ClientInstruction(payload, hooks=hooks) for c in client_ids}


class LGFedAvgOptions(StrategyOptions):
    weighting: ReplyWeighting = Field(
        "uniform", description="uniform: 1/K per client (the reference); examples: n_i / sum n_j"
    )


@register_strategy
class LGFedAvg(OwnModelBaseline[LGFedAvgOptions]):
    """LG-FedAvg: every client trains its own model; the classifier on the common space is averaged."""

    name = "lg-fedavg"
    Options: ClassVar[type[StrategyOptions]] = LGFedAvgOptions

    def initial_personal_state(self, client_models: ClientModels) -> AdapterState:
        """The unused shared adapter (B = 0, for evaluation) and the first architecture's initial head."""
        head = client_models.to_shared(to_cpu(dict(client_models.adapters[0].base_parameters())))
        return {
            **client_models.initial_shared_state(),
            **{k: v for k, v in head.items() if k.startswith(HEAD_PREFIX)},
        }

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return [TrainOwnModel(send=("classifier.",))]

    def shared_part(self, state: ServerState) -> AdapterState:
        """The global head only (each client loads it over its own)."""
        return {k: v for k, v in state.adapter.items() if k.startswith(HEAD_PREFIX)}

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        head = weighted_average([r.payload for r in replies], reply_weights(replies, self.options.weighting))
        return state.evolve({GLOBAL: {**state.adapter, **head}})
