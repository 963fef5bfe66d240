"""The strategy interface: what a federated method decides, and nothing about how clients are run.

Like Flower's Strategy, a strategy has explicit hooks, called by any engine in this order each round:

1. ``configure(round, client_ids)`` -> one :class:`ClientInstruction` per sampled client (its own payload,
   e.g. its own rank, and local-training overrides such as the optimizer or the FedProx mu);
2. ``validate_reply(instruction, reply)`` -> None, or why the reply is rejected (it is left out and logged);
3. ``aggregate(round, replies)`` -> the new global adapter state.

Between validation and aggregation ``screen(replies)`` may still set replies aside (robustness wrappers);
``round_metrics()`` adds figures to the round's record and ``report()`` lines to the final summary.
``server_state()`` / ``load_server_state()`` hold the tensors the server needs to resume (safetensors on disk)
and ``server_meta()`` / ``load_server_meta()`` its JSON side (e.g. the privacy ledger).

What a method does on the clients is a list of :class:`~fedlora.client.hooks.ClientHooks` objects in each
instruction (``client_hooks()``); cross-cutting features (DP-SGD, update-norm screening) wrap any strategy
(:mod:`fedlora.strategies.wrappers`). Engines never know a method by name: they only call these hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict

from fedlora.adapters.merged import split_merged
from fedlora.adapters.ranks import LoraScaling, RankProfile, lora_key_parts
from fedlora.adapters.state import AdapterState, clone_state
from fedlora.client.hooks import ClientHooks
from fedlora.config.schema import AdapterConfig
from fedlora.protocol import ClientInstruction, ClientReply

if TYPE_CHECKING:
    from fedlora.adapters.lora import LoraAdapters
    from fedlora.models.personal import ClientModels


@dataclass
class ServerSetup:
    """What a strategy starts from: the seeded initial adapter at the federation's largest rank profile,
    each client's rank profile (from the config, or in deployment from the clients themselves), the
    federation-wide LoRA alpha (s_r = alpha / r on every client, alpha / sqrt(r) when ``rank_stabilized``)
    and the run seed."""

    initial_state: AdapterState
    client_profiles: dict[int, RankProfile]
    lora_alpha: float
    seed: int = 0
    #: each client's number of training examples, as the server knows it (registered, not claimed)
    client_sizes: dict[int, int] | None = None
    #: where the aggregation arithmetic may run (``compute.server_device``); states stay on the CPU
    device: str = "cpu"
    #: rsLoRA's s_r = alpha / sqrt(r) (``adapter.use_rslora``) instead of alpha / r
    rank_stabilized: bool = False
    #: one constant s at every rank (``adapter.scale``) instead of either rule
    lora_scale: float | None = None


class StrategyOptions(BaseModel):
    """Base of each strategy's own options (``strategy.options`` in the config); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


OptionsT = TypeVar("OptionsT", bound=StrategyOptions)


@dataclass(frozen=True)
class ExperimentFacts:
    """What a method may refuse an experiment for, and nothing else of the config (built by the preflight,
    :func:`fedlora.preflight.experiment_facts`)."""

    #: ``model.task``: causal-lm or classification
    task: str = "causal-lm"
    #: ``model.quantization`` is set (a 4/8-bit base model)
    quantized: bool = False
    #: ``len(model.variants)``: the client architectures (0: one shared base model)
    num_variants: int = 0
    #: ``model.shared_adapter``: what model-heterogeneous clients share
    shared_adapter: str = "adapter"
    #: ``privacy.enabled``: the clients train with DP-SGD
    privacy: bool = False
    #: ``client.gradient_accumulation_steps``
    gradient_accumulation_steps: int = 1
    #: ``client.lr_scheduler``
    lr_scheduler: str = "constant"
    #: ``client.weight_decay``
    weight_decay: float = 0.0
    #: ``adapter.use_dora``: DoRA's magnitude vectors travel beside A and B
    use_dora: bool = False
    #: ``compute.base_dtype``: the frozen base's linear weights in fp32, bf16 or fp16
    base_dtype: str = "fp32"


def check_same_layout(expected: AdapterState, got: AdapterState) -> str | None:
    """None if ``got`` has exactly the keys and shapes of ``expected`` and only finite values, else why not."""
    if expected.keys() != got.keys():
        missing = sorted(expected.keys() - got.keys())[:2]
        extra = sorted(got.keys() - expected.keys())[:2]
        return f"tensor names differ (missing {missing}, unexpected {extra})"
    for key, tensor in got.items():
        if tensor.shape != expected[key].shape:
            parts = lora_key_parts(key)
            if parts is not None and tensor.ndim == 2 and tensor.shape != expected[key].shape:
                axis = 0 if parts[1] == "A" else 1
                got_rank, want_rank = tensor.shape[axis], expected[key].shape[axis]
                if got_rank != want_rank and tensor.shape[1 - axis] == expected[key].shape[1 - axis]:
                    return f"{key}: rank {got_rank}, but the client was given rank {want_rank}"
            return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
        if not torch.isfinite(tensor).all():
            return f"{key}: non-finite values"
    return None


def check_example_count(strategy: Strategy, reply: ClientReply) -> str | None:
    """None if ``reply.num_examples`` is in 1..the client's registered size (when the server knows it)."""
    if reply.num_examples <= 0:
        return f"num_examples is {reply.num_examples}"
    size = strategy.client_sizes.get(reply.client_id)
    if size is not None and reply.num_examples > size:
        return f"claims {reply.num_examples} examples; client {reply.client_id} holds {size}"
    return None


def example_weights(replies: list[ClientReply]) -> list[float]:
    """p_i = n_i / sum_j n_j over the replies that are aggregated."""
    total = sum(r.num_examples for r in replies)
    if total <= 0:
        raise ValueError("cannot weight replies with no examples")
    return [r.num_examples / total for r in replies]


#: how a method weights the round's replies: ``examples`` p_i = n_i / sum_j n_j, ``uniform`` 1 / K
ReplyWeighting = Literal["examples", "uniform"]


def reply_weights(replies: list[ClientReply], weighting: ReplyWeighting) -> list[float]:
    """The aggregation weights of ``replies``: :func:`example_weights`, or 1 / K for each of the K replies."""
    if weighting == "uniform":
        return [1.0 / len(replies)] * len(replies)
    return example_weights(replies)


def weighted_average(states: list[AdapterState], weights: list[float]) -> AdapterState:
    """sum_i w_i * state_i, tensor by tensor, accumulated in float64 and cast back to each tensor's dtype."""
    out: AdapterState = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights, strict=True):
            acc += weight * state[key].to(torch.float64)
        out[key] = acc.to(first.dtype)
    return out


class Strategy(ABC, Generic[OptionsT]):
    """Base class: holds the global adapter state and default hooks; a method overrides what differs.

    ``Strategy[MyOptions]`` types ``self.options`` as ``MyOptions``; ``Options = MyOptions`` is what the config's
    ``strategy.options`` are validated against."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: the local optimizer this method is defined with, unless the config's client.optimizer says otherwise
    default_optimizer: ClassVar[str] = "adamw"
    #: True when the method trains the base model's weights (no adapter): the state is the full model
    trains_full_model: bool = False
    #: False for a no-communication baseline (standalone local training): no bytes are counted
    communicates: bool = True
    #: True when the clients' own model weights travel with the adapter (whole-model FedAvg baseline)
    shares_local_model: bool = False
    #: True when every client trains its own model weights, which must then live apart (model.variants)
    personal_models: ClassVar[bool] = False
    #: True when ``aggregate`` is an example-weighted average of the payloads (robust rules can replace it)
    linear_aggregate: ClassVar[bool] = False
    #: True when the method's rule treats every tensor of the payload alike, so DoRA's magnitude vectors
    #: (``adapter.use_dora``) are aggregated as A and B are; methods that read A/B pairs leave it False
    supports_dora: ClassVar[bool] = False

    @classmethod
    def refusal(cls, facts: ExperimentFacts, options: OptionsT) -> str | None:
        """Why this method cannot honour the experiment as configured (None: it can).

        Checked wherever a run starts (config file, Python-built config, resume, Flower), before any work.
        The default refuses privacy when one of the method's client hooks cannot run under DP-SGD, and
        optimizer-step settings (schedule, accumulation) when a hook replaces the optimizer's steps.
        """
        if facts.use_dora and not cls.supports_dora:
            return (
                f"config field 'adapter.use_dora': strategy {cls.name} aggregates LoRA's A/B pairs and has no "
                "rule for DoRA's magnitude vectors; use fedit, fedavg or fedprox, or set adapter.use_dora: false"
            )
        if facts.base_dtype != "fp32" and cls(options).trains_full_model:
            return (
                f"config field 'compute.base_dtype': strategy {cls.name} trains the base model's own weights, "
                f"which stay float32; set compute.base_dtype: fp32"
            )
        if facts.gradient_accumulation_steps > 1 or facts.lr_scheduler != "constant":
            for hook in cls(options).client_hooks():
                if hook.replaces_optimizer:
                    field = (
                        "gradient_accumulation_steps"
                        if facts.gradient_accumulation_steps > 1
                        else "lr_scheduler"
                    )
                    return (
                        f"config field 'client.{field}': strategy {cls.name} takes its own kind of steps "
                        f"({hook.kind}), not optimizer steps; set client.gradient_accumulation_steps: 1 and "
                        "client.lr_scheduler: constant"
                    )
        if facts.privacy:
            for hook in cls(options).client_hooks():
                reason = hook.dp_refusal()
                if reason is not None:
                    return (
                        f"config field 'privacy.enabled': strategy {cls.name} cannot run under DP-SGD: {reason}; "
                        "no epsilon it reported would be a guarantee. Turn privacy off or use fedit, fedavg, "
                        "ffa-lora, flexlora or hetlora without penalties"
                    )
        return None

    @classmethod
    def adapter_config(cls, adapter: AdapterConfig, options: OptionsT) -> AdapterConfig:
        """The adapter section the federation trains with under this method (default: the config's). A method
        whose reference code fixes the LoRA scale returns it with ``scale`` set (Fed-SB: 1, FLoRA: 2), unless
        the config sets one; every node and the server use the result (:class:`~fedlora.engine.node_spec.NodeSpec`)."""
        return adapter

    def __init__(self, options: OptionsT | None = None) -> None:
        self.options: OptionsT = options if options is not None else cast(OptionsT, self.Options())
        self.global_state: AdapterState = {}
        self.client_profiles: dict[int, RankProfile] = {}
        self.lora_scaling = LoraScaling(1.0)
        self.seed = 0
        self.client_sizes: dict[int, int] = {}

    def initialize(self, setup: ServerSetup) -> None:
        """Start from the seeded initial adapter (round 1's payload) and learn each client's rank profile."""
        self.global_state = clone_state(setup.initial_state)
        self.client_profiles = dict(setup.client_profiles)
        self.lora_scaling = LoraScaling(setup.lora_alpha, setup.rank_stabilized, setup.lora_scale)
        self.seed = setup.seed
        self.client_sizes = dict(setup.client_sizes or {})
        self.server_device = torch.device(setup.device)

    def register_client(
        self, client_id: int, num_examples: int | None = None, profile: RankProfile | None = None
    ) -> None:
        """Learn a client after :meth:`initialize` (a Flower node's registration): its number of training
        examples (fixed from then on: later replies cannot claim more) and its own rank profile."""
        if num_examples is not None:
            self.client_sizes[client_id] = num_examples
        if profile is not None:
            self.client_profiles[client_id] = profile

    def initial_adapter(self, adapters: LoraAdapters, profile: RankProfile) -> AdapterState:
        """The adapter the run starts from, at the federation's largest rank ``profile`` (default: PEFT's seeded
        initialisation, B = 0); a method with its own initialisation (Fed-SB's SVD of the base weights)
        overrides it. Called by the engine before :meth:`initialize`."""
        return adapters.initial_state(profile)

    def initial_personal_state(self, client_models: ClientModels) -> AdapterState:
        """The first global state of a model-heterogeneous federation (``model.variants``), in its wire form
        (default: the shared adapter); a method that shares something else (a head, class prototypes, the
        whole model) overrides it. Called by the engine before :meth:`initialize`."""
        return client_models.initial_shared_state()

    def client_hooks(self) -> list[ClientHooks]:
        """The method's client-side behaviour (default: none, plain local training)."""
        return []

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        """Default: every sampled client gets the current global adapter and the method's client hooks."""
        hooks = self.client_hooks()
        return {cid: ClientInstruction(self.global_state, hooks=hooks) for cid in client_ids}

    def validate_reply(self, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        """Default: the reply must have the tensor names and shapes of :meth:`expected_reply`, finite values,
        and a number of examples above 0 and at most what the client holds."""
        return check_example_count(self, reply) or check_same_layout(
            self.expected_reply(instruction), reply.payload
        )

    def expected_reply(self, instruction: ClientInstruction) -> AdapterState:
        """What a client sends back for ``instruction`` (the trainer's own rule): the payload's tensors minus
        a merged base offset (``merged.*``) and minus those the instruction's hooks freeze."""
        adapter, _ = split_merged(instruction.payload)
        return {k: v for k, v in adapter.items() if not any(h.frozen(k) for h in instruction.hooks)}

    @abstractmethod
    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        """Turn this round's valid replies into the new global state (and store it)."""

    def screen(self, replies: list[ClientReply]) -> tuple[list[ClientReply], list[tuple[int, str]]]:
        """Set replies aside after validation, seeing the whole round (default: keep all)."""
        return replies, []

    def round_metrics(self) -> dict[str, float]:
        """Figures for the round's record (default: none)."""
        return {}

    def report(self) -> list[str]:
        """Lines for the run's final summary (default: none)."""
        return []

    def evaluation_state(self) -> AdapterState:
        """The adapter used to evaluate and export the global model."""
        return self.global_state

    def extra_evaluation_states(self) -> dict[str, AdapterState]:
        """Other global models the final evaluation also measures, by name (default: none); their figures
        are recorded as ``eval_<metric>_<name>`` next to those of :meth:`evaluation_state`."""
        return {}

    def personal_state(self, client_id: int) -> AdapterState:
        """The adapter a client is evaluated with under the personalised protocol (default: the global one)."""
        return self.evaluation_state()

    def server_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume the server side (default: the global adapter)."""
        return clone_state(self.global_state)

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.global_state = clone_state(tensors)

    def server_meta(self) -> dict[str, Any]:
        """The JSON side of the server state, kept in each checkpoint's metadata (default: none)."""
        return {}

    def load_server_meta(self, meta: dict[str, Any]) -> None:
        """Restore what :meth:`server_meta` wrote (the whole checkpoint metadata is passed; default: nothing)."""
        return None
