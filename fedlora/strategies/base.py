"""The strategy interface: a federated method is rules over a server state that the engine owns.

As in Flower's strategies, the method does not hold the global arrays: :meth:`Strategy.initialize` returns the
first :class:`ServerState` (named groups of tensors plus JSON-able facts and each client's rank profile), the
engine keeps it, checkpoints it whole (safetensors + JSON) and passes it into every hook, and a hook that
changes it returns a new one. Each round an engine calls:

1. ``configure_round(state, round, client_ids)`` -> one :class:`ClientInstruction` per sampled client (its
   payload, local-training overrides such as the optimizer, and the method's client hooks);
2. ``review(state, round, results)`` -> :class:`Review`: the new state (a ledger, a history), the replies
   kept and those left out with why (default: :func:`check_reply` on each);
3. ``aggregate(state, round, replies)`` -> the new state;
4. ``round_metrics(state)`` -> figures for the round's record.

and at the end ``evaluation_state(state)`` / ``extra_evaluation_states(state)`` (the global model(s)),
``personal_state(state, client)`` and ``report(state)``. Before the first round ``initial_adapter`` (or
``initial_personal_state``) makes the start, and the class-level ``refusal`` / ``adapter_config`` are read by
the preflight. No method writes persistence code: what is in the state is saved and restored, bit for bit.

What a method does on the clients is a list of :class:`~fedlora.client.hooks.ClientHooks` objects in each
instruction (``client_hooks(state)``); cross-cutting features (DP-SGD, update-norm screening, robust rules)
wrap any strategy by explicit delegation (:mod:`fedlora.strategies.wrappers`). Engines never know a method by
name: they only call these hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, cast

import torch
from pydantic import BaseModel, ConfigDict

from fedlora.adapters.merged import split_merged
from fedlora.adapters.ranks import LoraScaling, RankProfile, lora_key_parts
from fedlora.adapters.state import AdapterState, clone_state
from fedlora.client.hooks import ClientHooks
from fedlora.config.schema import AdapterConfig
from fedlora.config.sections.training import OptimizerName
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

    def register_client(
        self, client_id: int, num_examples: int | None = None, profile: RankProfile | None = None
    ) -> None:
        """Learn a client after the start (a Flower node's registration): its number of training examples
        (fixed from then on: later replies cannot claim more) and its own rank profile."""
        if num_examples is not None:
            self.client_sizes = {**(self.client_sizes or {}), client_id: num_examples}
        if profile is not None:
            self.client_profiles[client_id] = profile

    @property
    def scaling(self) -> LoraScaling:
        """s_r of every rank under this federation's rule."""
        return LoraScaling(self.lora_alpha, self.rank_stabilized, self.lora_scale)


#: the group of :attr:`ServerState.arrays` that holds the global adapter (what clients are sent by default)
GLOBAL = "global"


@dataclass(frozen=True)
class ServerState:
    """Everything the server knows between rounds, owned by the engine (Flower's ArrayRecord + ConfigRecord).

    ``arrays``: named groups of tensors (``"global"``: the adapter clients start from; a method adds its own,
    e.g. FFA-LoRA's frozen A, FlexLoRA's untruncated factors, pFedLoRA's per-client adapters); ``facts``:
    JSON values (a privacy ledger, a loss history); ``profiles``: each client's current rank profile (HetLoRA's
    pruning lowers them). A hook never changes a state in place (tensors included): it returns a new one, so
    a failed or retried round leaves the previous state intact and a checkpoint is exactly what was used.
    Group names hold no ``/`` (the checkpoint's key is ``<group>/<tensor name>``)."""

    arrays: Mapping[str, AdapterState] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)
    profiles: Mapping[int, RankProfile] = field(default_factory=dict)

    @property
    def adapter(self) -> AdapterState:
        """The ``global`` group: the adapter clients start from."""
        return dict(self.arrays.get(GLOBAL, {}))

    def group(self, name: str) -> AdapterState:
        """One group of tensors (empty if the state has none of that name)."""
        return dict(self.arrays.get(name, {}))

    def evolve(
        self,
        arrays: Mapping[str, AdapterState] | None = None,
        facts: Mapping[str, Any] | None = None,
        profiles: Mapping[int, RankProfile] | None = None,
    ) -> ServerState:
        """A new state with these groups, facts and profiles replaced (the rest shared)."""
        return replace(
            self,
            arrays={**self.arrays, **(arrays or {})},
            facts={**self.facts, **(facts or {})},
            profiles={**self.profiles, **(profiles or {})},
        )

    def without(self, *groups: str) -> ServerState:
        """A new state without these groups of tensors."""
        return replace(self, arrays={k: v for k, v in self.arrays.items() if k not in groups})


@dataclass(frozen=True)
class Review:
    """What :meth:`Strategy.review` decided about a round's replies: the state after it (a ledger that counted
    them), the replies to aggregate, and ``(client, why)`` for each left out."""

    state: ServerState
    accepted: list[ClientReply]
    rejected: list[tuple[int, str]] = field(default_factory=list)


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
    #: ``privacy.enabled`` with ``unit: example``: the clients train with DP-SGD
    privacy: bool = False
    #: ``privacy.enabled`` with ``unit: client``: the server clips and noises the updates (DP-FedAvg)
    client_privacy: bool = False
    #: ``federation.secure_aggregation``: the server sees only the example-weighted average of the replies
    secure_aggregation: bool = False
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


def client_privacy_refusal(name: str, linear_aggregate: bool) -> str | None:
    """Why strategy ``name`` cannot run under client-level DP (its aggregate has no sensitivity bound from
    clipped payloads), or None (:mod:`fedlora.strategies.client_privacy`)."""
    if linear_aggregate:
        return None
    return (
        f"config field 'privacy.unit': client-level DP clips each client's update and noises their average, "
        f"and strategy {name} does not aggregate by a weighted average of the payloads, so clipping "
        "them bounds nothing; use privacy.unit: example (DP-SGD on each client), or fedit, fedavg, fedprox, "
        "ffa-lora, fedsa-lora or pfedlora"
    )


def secure_aggregation_refusal(name: str) -> str:
    """Why strategy ``name`` cannot run under secure aggregation (:mod:`fedlora.engine.flower.secure`)."""
    return (
        f"config field 'federation.secure_aggregation': SecAgg+ reveals only the example-weighted average of "
        f"the replies, and strategy {name} aggregates otherwise (each reply on its own, or a nonlinear rule), so "
        "it needs what the protocol hides; use fedit, fedavg, fedprox, ffa-lora or fedsa-lora, or turn "
        "secure_aggregation off"
    )


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


def check_example_count(setup: ServerSetup, reply: ClientReply) -> str | None:
    """None if ``reply.num_examples`` is in 1..the client's registered size (when the server knows it)."""
    if reply.num_examples <= 0:
        return f"num_examples is {reply.num_examples}"
    size = (setup.client_sizes or {}).get(reply.client_id)
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


def expected_reply(instruction: ClientInstruction) -> AdapterState:
    """What a client sends back for ``instruction`` (the trainer's own rule): the payload's tensors minus a
    merged base offset (``merged.*``) and minus those the instruction's hooks freeze."""
    adapter, _ = split_merged(instruction.payload)
    return {k: v for k, v in adapter.items() if not any(h.frozen(k) for h in instruction.hooks)}


def check_reply(setup: ServerSetup, instruction: ClientInstruction, reply: ClientReply) -> str | None:
    """The default validation: a number of examples above 0 and at most what the client holds, and the
    tensor names and shapes of :func:`expected_reply` with finite values. None, or why the reply is refused."""
    return check_example_count(setup, reply) or check_same_layout(expected_reply(instruction), reply.payload)


#: one round's results as :meth:`Strategy.review` sees them: (what the client was sent, what it replied)
RoundResults = list[tuple[ClientInstruction, ClientReply]]


class Strategy(ABC, Generic[OptionsT]):
    """Base class: the default rules; a method overrides what differs. It holds its options and the run's
    :class:`ServerSetup` (configuration, set by :meth:`initialize`), never the state between rounds.

    ``Strategy[MyOptions]`` types ``self.options`` as ``MyOptions``; ``Options = MyOptions`` is what the config's
    ``strategy.options`` are validated against. The class facts below are what engines read of a method
    (a wrapper reports its inner method's: :data:`STRATEGY_FACTS`)."""

    name: ClassVar[str]
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: the local optimizer this method is defined with, unless the config's client.optimizer says otherwise
    default_optimizer: ClassVar[OptimizerName] = "adamw"
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
    #: config overrides the method needs to run at all on the conformance suite's tiny experiment
    #: (:mod:`fedlora.testing.conformance`), e.g. ``model.variants`` where each client trains its own model
    conformance_overrides: ClassVar[dict[str, object]] = {}

    def __init__(self, options: OptionsT | None = None) -> None:
        self.options: OptionsT = options if options is not None else cast(OptionsT, self.Options())
        self.setup = ServerSetup({}, {}, 1.0)

    # --- class-level: read by the preflight before anything loads ------------------------------------------

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
        method = cls(options)
        if facts.base_dtype != "fp32" and method.trains_full_model:
            return (
                f"config field 'compute.base_dtype': strategy {cls.name} trains the base model's own weights, "
                f"which stay float32; set compute.base_dtype: fp32"
            )
        hooks = method.client_hooks(ServerState())
        if facts.gradient_accumulation_steps > 1 or facts.lr_scheduler != "constant":
            for hook in hooks:
                if hook.replaces_optimizer:
                    field_name = (
                        "gradient_accumulation_steps"
                        if facts.gradient_accumulation_steps > 1
                        else "lr_scheduler"
                    )
                    return (
                        f"config field 'client.{field_name}': strategy {cls.name} takes its own kind of steps "
                        f"({hook.kind}), not optimizer steps; set client.gradient_accumulation_steps: 1 and "
                        "client.lr_scheduler: constant"
                    )
        if facts.client_privacy and not cls.linear_aggregate:
            return client_privacy_refusal(cls.name, cls.linear_aggregate)
        if facts.secure_aggregation and not cls.linear_aggregate:
            return secure_aggregation_refusal(cls.name)
        if facts.privacy:
            for hook in hooks:
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

    # --- the start -------------------------------------------------------------------------------------------

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

    def initialize(self, setup: ServerSetup) -> ServerState:
        """Keep the run's configuration and return the first state: the seeded initial adapter as the ``global``
        group (round 1's payload) and each client's rank profile."""
        self.setup = setup
        return ServerState({GLOBAL: clone_state(setup.initial_state)}, {}, dict(setup.client_profiles))

    # --- each round ------------------------------------------------------------------------------------------

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        """The method's client-side behaviour (default: none, plain local training). Also asked with an empty
        state by :meth:`refusal` (what the hooks can and cannot run under)."""
        return []

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        """Default: every sampled client gets the global adapter and the method's client hooks."""
        payload, hooks = state.adapter, self.client_hooks(state)
        return {cid: ClientInstruction(payload, hooks=hooks) for cid in client_ids}

    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        """Decide which replies of the round to aggregate, seeing all of them (default: :func:`check_reply` on
        each, the state unchanged). A method that checks replies its own way overrides :meth:`check`."""
        accepted, rejected = [], []
        for instruction, reply in results:
            reason = self.check(state, instruction, reply)
            if reason is None:
                accepted.append(reply)
            else:
                rejected.append((reply.client_id, reason))
        return Review(state, accepted, rejected)

    def check(self, state: ServerState, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        """One reply's validity: None, or why it is refused (default: :func:`check_reply`)."""
        return check_reply(self.setup, instruction, reply)

    @abstractmethod
    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        """Turn this round's accepted replies into the next state."""

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        """Figures for the round's record (default: none)."""
        return {}

    # --- the result ------------------------------------------------------------------------------------------

    def evaluation_state(self, state: ServerState) -> AdapterState:
        """The adapter used to evaluate and export the global model (default: the ``global`` group)."""
        return state.adapter

    def extra_evaluation_states(self, state: ServerState) -> dict[str, AdapterState]:
        """Other global models the final evaluation also measures, by name (default: none); their figures
        are recorded as ``eval_<metric>_<name>`` next to those of :meth:`evaluation_state`."""
        return {}

    def personal_state(self, state: ServerState, client_id: int) -> AdapterState:
        """The adapter a client is evaluated with under the personalised protocol (default: the global one)."""
        return self.evaluation_state(state)

    def report(self, state: ServerState) -> list[str]:
        """Lines for the run's final summary (default: none)."""
        return []


#: the class facts a wrapper reports from the method it wraps (every fact annotated on :class:`Strategy`)
STRATEGY_FACTS: tuple[str, ...] = tuple(Strategy.__annotations__)
