"""FedProto (Tan et al., AAAI 2022): clients share class prototypes, not weights.

A model-heterogeneous baseline for pFedLoRA (``model.variants`` with ``model.shared_adapter: representation``).
A client's representation of an example is z = gelu(P h) in the common ``shared_dim``-wide space (h its model's
pooled representation, P its own projection; see :class:`fedlora.models.personal.RepresentationHead`). Each
client trains its own model end to end on

    L = CE(C z, y) + lambda * (1 / (B shared_dim)) sum_{b: y_b known} ||z_b - c_{y_b}||^2

over a batch of B examples, c_y the global prototype of class y. ``distance: batch`` (the default, the
reference's ``nn.MSELoss()(proto_new, protos)`` in ``lib/update.py`` of yuetan031/FedProto, where a row of a
class with no global prototype yet is its own detached z, so it adds 0 but counts in the mean) divides by the
whole batch; ``distance: known`` averages over the rows whose class has a prototype. The client then sends its
local prototypes c_{i,k} = mean of z over its training examples of class k, and how many there are, n_{i,k}.
Server, per class k, over the clients S_k that hold it: ``prototype_weighting: uniform`` (the default, the
reference's ``proto_aggregation`` in ``lib/utils.py``) c_k = (1 / |S_k|) sum_{i in S_k} c_{i,k};
``prototype_weighting: examples`` c_k = sum_i n_{i,k} c_{i,k} / sum_i n_{i,k}. Nothing else travels: a few
kilobytes per client and round (num_labels x shared_dim floats and num_labels counts).

Evaluation (as every personalised method here): each client's own model and classifier on its own test split.
The paper also classifies by the nearest global prototype; fedlora reports the classifier's accuracy.
Differences from the reference code: the prototypes live in the common space of the representation head (the
paper's CNNs share one feature width); the local prototypes are computed after the round's steps in one extra
pass over the client's training examples (the reference averages the features seen during the last epoch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.compute import model_device
from fedlora.linalg import tensor_sum
from fedlora.models.personal import HEAD_NAMES, RepresentationHead
from fedlora.strategies.base import GLOBAL, ClientReply, ServerState, StrategyOptions
from fedlora.strategies.lg_fedavg import OwnModelBaseline, TrainOwnModel
from fedlora.strategies.registry import register_strategy

if TYPE_CHECKING:
    from fedlora.models.personal import ClientModels

PROTOTYPES = "prototypes.mean"  # num_labels x shared_dim
COUNTS = "prototypes.count"  # num_labels (float64)


class FedProtoOptions(StrategyOptions):
    weight: float = Field(1.0, ge=0.0, description="lambda, the weight of the prototype distance term")
    prototype_weighting: Literal["uniform", "examples"] = Field(
        "uniform",
        description="uniform: mean over the clients holding a class (the reference); examples: n_{i,k}",
    )
    distance: Literal["batch", "known"] = Field(
        "batch",
        description="batch: the MSE over the whole batch (the reference); known: over known-class rows",
    )


def representation_head(model: torch.nn.Module) -> RepresentationHead:
    """The model's representation head (the base model under PEFT's wrapper)."""
    base_of = getattr(model, "get_base_model", None)  # PEFT's wrapper
    base = base_of() if base_of is not None else model
    for name in HEAD_NAMES:
        head = getattr(base, name, None)
        if isinstance(head, RepresentationHead):
            return head
    raise ValueError("fedproto needs model.shared_adapter: representation (no representation head found)")


class SharedRepresentation:
    """Records, for each forward pass of the model, every example's z = gelu(P h) (the input of the head's
    bridge) and its label; a decoder's per-token z is pooled at its last non-padding token, the rule of
    Hugging Face's sequence classifiers."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int | None) -> None:
        self.pad = pad_token_id
        self.z: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        head = representation_head(model)
        self._handles = [
            model.register_forward_pre_hook(self._inputs, with_kwargs=True),
            head.bridge.register_forward_pre_hook(self._bridge_input),
        ]

    def _inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self._ids, self.labels = kwargs.get("input_ids"), kwargs.get("labels")

    def _bridge_input(self, module: torch.nn.Module, args: tuple) -> None:
        z = args[0]
        if z.ndim == 3:  # (batch, tokens, shared_dim): the token the classifier reads
            assert self._ids is not None
            mask = (self._ids != self.pad).int() if self.pad is not None else torch.ones_like(self._ids)
            last = (torch.arange(self._ids.shape[-1], device=z.device) * mask).argmax(-1)
            z = z[torch.arange(z.shape[0], device=z.device), last]
        self.z = z

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


@register_client_hooks
class PrototypeRegularised(TrainOwnModel):
    """FedProto's client: own-model training with the prototype distance term; replies its class prototypes."""

    kind = "fedproto"
    weight: float = Field(1.0, ge=0.0)
    distance: Literal["batch", "known"] = "batch"

    def start_state(self, ctx: ClientContext, payload: AdapterState) -> AdapterState:
        ctx.scratch["global"] = (payload[PROTOTYPES], payload[COUNTS])
        return super().start_state(ctx, {})

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        assert ctx.adapters.model is not None
        ctx.scratch["tap"] = SharedRepresentation(ctx.adapters.model, ctx.encoder.tokenizer.pad_token_id)
        return super().before_training(ctx)

    def extra_loss(self, ctx: ClientContext) -> torch.Tensor | None:
        tap: SharedRepresentation = ctx.scratch["tap"]
        prototypes, counts = ctx.scratch["global"]
        if tap.z is None or tap.labels is None or self.weight == 0:
            return None
        known = counts.to(tap.labels.device)[tap.labels] > 0
        if not known.any():
            return None
        target = prototypes.to(tap.z.device, tap.z.dtype)[tap.labels[known]]
        squared = torch.nn.functional.mse_loss(tap.z[known], target, reduction="sum")
        rows = tap.z.shape[0] if self.distance == "batch" else int(known.sum())
        return self.weight * squared / (rows * tap.z.shape[1])

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        super().reply_state(ctx, state, metrics)  # freezes the own model again
        tap: SharedRepresentation = ctx.scratch.pop("tap")
        model = ctx.adapters.model
        assert model is not None
        prototypes, _ = ctx.scratch["global"]
        sums = torch.zeros(prototypes.shape, dtype=torch.float64)
        counts = torch.zeros(prototypes.shape[0], dtype=torch.float64)
        n, size = len(ctx.encoded), ctx.settings.batch_size
        model.eval()
        with torch.no_grad():
            for start in range(0, n, size):
                batch = [ctx.encoded[i] for i in range(start, min(n, start + size))]
                inputs = {k: v.to(model_device(model)) for k, v in ctx.encoder.training_batch(batch).items()}
                model(**inputs)
                assert tap.z is not None and tap.labels is not None
                labels = tap.labels.cpu()
                sums.index_add_(0, labels, tap.z.detach().double().cpu())
                counts.index_add_(0, labels, torch.ones(len(labels), dtype=torch.float64))
        tap.remove()
        means = sums / counts.clamp(min=1).unsqueeze(1)
        return {PROTOTYPES: means.to(prototypes.dtype), COUNTS: counts}


@register_strategy
class FedProto(OwnModelBaseline[FedProtoOptions]):
    """FedProto: each client trains its own model with a pull towards the global class prototypes; the
    server averages the clients' prototypes class by class, weighted by their example counts."""

    name = "fedproto"
    Options: ClassVar[type[StrategyOptions]] = FedProtoOptions

    def initial_personal_state(self, client_models: ClientModels) -> AdapterState:
        """The unused shared adapter (B = 0, for evaluation) and empty prototypes (no class has one yet)."""
        labels = client_models.bundles[0].num_labels or 0
        return {
            **client_models.initial_shared_state(),
            PROTOTYPES: torch.zeros(labels, client_models.shared_dim),
            COUNTS: torch.zeros(labels, dtype=torch.float64),
        }

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        return [PrototypeRegularised(weight=self.options.weight, distance=self.options.distance)]

    def shared_part(self, state: ServerState) -> AdapterState:
        """The global prototypes and their counts."""
        return {k: state.adapter[k] for k in (PROTOTYPES, COUNTS)}

    def personal_state(self, state: ServerState, client_id: int) -> AdapterState:
        """For evaluation: the client's own model with the unused adapter (the prototypes are not weights)."""
        return {k: v for k, v in state.adapter.items() if k not in (PROTOTYPES, COUNTS)}

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        """Per class, over the clients that hold it: the mean of their prototypes (``uniform``) or the
        example-weighted mean (``examples``); a class none of this round's clients holds keeps its prototype
        (and count, the examples behind it)."""
        uniform = self.options.prototype_weighting == "uniform"
        weights = [(r.payload[COUNTS] > 0).double() if uniform else r.payload[COUNTS] for r in replies]
        sums = tensor_sum(
            r.payload[PROTOTYPES].double() * w.unsqueeze(1) for r, w in zip(replies, weights, strict=True)
        )
        mass = tensor_sum(weights)
        counts = tensor_sum(r.payload[COUNTS] for r in replies)
        current = state.adapter
        old, old_counts = current[PROTOTYPES], current[COUNTS]
        present = counts > 0
        new = torch.where(present.unsqueeze(1), sums / mass.clamp(min=1e-300).unsqueeze(1), old.double())
        updated = {PROTOTYPES: new.to(old.dtype), COUNTS: torch.where(present, counts, old_counts)}
        return state.evolve({GLOBAL: {**current, **updated}})
