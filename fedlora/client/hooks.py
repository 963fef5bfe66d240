"""Client hooks: a method's client-side behaviour, as objects the method owns (like PEFT's LoRA variants).

The generic trainer (:mod:`fedlora.client.trainer`) knows first-order steps, DP-SGD steps, zeroth-order steps
and batching, nothing method-specific. What a method changes on the client is a list of hook objects the
strategy puts in each :class:`~fedlora.protocol.ClientInstruction`; each is a frozen pydantic model
(its typed options) registered under a ``kind``, so the same objects cross the embedded engine, worker
processes and Flower messages as JSON (``{"kind": "fedprox", "mu": 0.01}``), never pickle.

The hooks are called in one order, the same for every kind of local steps (first-order, DP-SGD,
zeroth-order, batched), written once in :mod:`fedlora.client.round`:

1. ``start_state(ctx, payload)``: the adapter to start from (FedKSeed rebuilds it from seed coefficients);
2. ``partial_payload`` / ``frozen(key)``: the payload may hold a subset of the adapter; frozen tensors are
   neither trained nor sent back (FFA-LoRA's A);
3. ``before_training(ctx)``: e.g. verify a digest, load personal state, a local-model phase (pFedLoRA);
4. ``extra_loss(ctx)``: a term added to every step's loss (FedProx, HetLoRA's rank penalty);
5. ``reply_state(ctx, state)``: what is sent back (HetLoRA's pruned rank; FedSA-LoRA keeps B at home).

``local_steps()`` replaces the optimizer's steps with the method's own kind (zeroth-order).

``dp_refusal()`` says why a hook cannot run under DP-SGD (a loss term that is not per-example, training on
private data outside DP-SGD); the privacy wrapper refuses such combinations before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from fedlora.adapters.state import AdapterState
from fedlora.registry import Registry

if TYPE_CHECKING:
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.client.settings import LocalTrainingSettings
    from fedlora.client.store import PersonalStore
    from fedlora.data.encoding import EncodedOnDemand, Encoder
    from fedlora.data.examples import ClientData

#: hooks by kind; each registers where its method is defined, and every process entry imports them all
#: first (:func:`fedlora.preflight.load_builtins`), so the client layer never imports a method
CLIENT_HOOKS: Registry[type[ClientHooks]] = Registry("client hook", "strategy.name")


@dataclass
class ClientContext:
    """What one client's round works with: its model, data, settings, seed and personal store."""

    adapters: LoraAdapters
    encoder: Encoder
    encoded: EncodedOnDemand
    settings: LocalTrainingSettings
    seed: int
    client_id: int
    server_round: int
    generator: torch.Generator
    store: PersonalStore | None = None
    #: the client's data, every split (e.g. for a personalised evaluation on its own eval split)
    data: ClientData | None = None
    #: the trainable (name, tensor) pairs, set by the trainer before ``before_training`` (a hook may train
    #: tensors of its own: Fed-SB's cores)
    trainable: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    #: per-round scratch space for hooks (e.g. FedProx's anchor)
    scratch: dict[str, Any] = field(default_factory=dict)


Frozen = Callable[[str], bool]


class LocalSteps(Protocol):
    """How a round's local steps load, train and read back the client's tensors (the kinds of steps:
    :mod:`fedlora.client.round`)."""

    def load(
        self, ctx: ClientContext, state: AdapterState, partial: bool, frozen: Frozen
    ) -> list[tuple[str, torch.Tensor]]:
        """Put ``state`` into the model; the (name, parameter) pairs the steps train (none that is frozen)."""
        ...

    def plan(self, ctx: ClientContext) -> None:
        """Draw the round's batches (from ``ctx.generator``, before the hooks' ``before_training``)."""
        ...

    def run(self, ctx: ClientContext, hooks: Sequence[ClientHooks]) -> dict[str, Any]:
        """The steps over ``ctx.trainable``; the metrics they report."""
        ...

    def trained(self, ctx: ClientContext, frozen: Frozen) -> AdapterState:
        """What the steps produced, minus the frozen tensors (before the hooks' ``reply_state``)."""
        ...

    def release(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics that may leave the client."""
        ...


class ClientHooks(BaseModel):
    """Base of every method's client hooks: no-ops. Fields are the hook's typed options."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    kind: ClassVar[str] = "base"
    #: the payload holds only some of the adapter's tensors (the rest stay as the client has them)
    partial_payload: ClassVar[bool] = False
    #: its clients may train in one batched pass (``compute.batch_clients``): it adds no loss term and has
    #: no training phase of its own (``before_training`` / ``reply_state`` only check or reshape state)
    batchable: ClassVar[bool] = False
    #: its steps are not optimizer steps (zeroth-order): schedules and gradient accumulation do not apply
    replaces_optimizer: ClassVar[bool] = False
    #: the reply weighs as every other reply of the round (client-level DP's 1 / m), not by its examples:
    #: secure aggregation sums it with weight 1
    equal_weight: ClassVar[bool] = False

    def frozen(self, key: str) -> bool:
        """Tensors that are neither trained nor sent back."""
        return False

    def start_state(self, ctx: ClientContext, payload: AdapterState) -> AdapterState:
        """The adapter to start from, given the payload (default: the payload itself; a method whose payload
        is not an adapter, e.g. FedKSeed's seed coefficients, rebuilds it here)."""
        return payload

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        """Runs after the payload is loaded, before the first step; returns metrics to report."""
        return {}

    def extra_loss(self, ctx: ClientContext) -> torch.Tensor | None:
        """A term added to each step's loss (None: nothing)."""
        return None

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        """The state sent back (default: the trained tensors minus frozen ones)."""
        return state

    def dp_refusal(self) -> str | None:
        """Why these hooks cannot run under DP-SGD (None: they can)."""
        return None

    def local_steps(self) -> LocalSteps | None:
        """The kind of local steps this method's clients take instead of optimizer steps (zeroth-order:
        :class:`~fedlora.client.zeroth_order.ZerothOrderSteps`; default None: the settings decide)."""
        return None

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **self.model_dump(mode="json")}


def register_client_hooks(cls: type[ClientHooks]) -> type[ClientHooks]:
    """Class decorator: make ``cls`` known under ``cls.kind`` (so it can cross the wire)."""
    CLIENT_HOOKS.register(cls.kind, cls)
    return cls


def hooks_from_json(items: list[dict[str, Any]]) -> list[ClientHooks]:
    """Rebuild hook objects from their :meth:`ClientHooks.to_json` forms (unknown kinds and options are
    errors)."""
    out = []
    for item in items:
        fields = dict(item)
        cls = CLIENT_HOOKS.get(fields.pop("kind"))
        out.append(cls.model_validate(fields))
    return out
