"""Model-heterogeneous clients (pFedLoRA): one base model per architecture, each client's own weights on disk.

Where the shared adapter attaches (``model.shared_adapter``):

- ``last-layer`` (default): LoRA on the attention projections named in ``adapter.target_modules`` (e.g.
  query/value, q_proj/v_proj) of each client model's LAST transformer layer. Client architectures differ in
  depth (and may differ in anything below the last layer), but the last layer's projections have the same
  shape whenever the hidden size and attention layout agree, so the adapter tensors have the same shape on
  every client. On the wire the layer index is written ``last``
  (``...encoder.layer.last.attention.self.query.lora_A.weight``) and each client maps them to its own last layer.
- ``representation`` (classification, any widths and architectures): each model's classifier is replaced by
  :class:`RepresentationHead`, ``logits = C(bridge(gelu(P h)))`` with h (d_model) the model's pooled
  representation, P (shared_dim x d_model) the client's own projection into a common ``shared_dim``-wide
  space, C (num_labels x shared_dim) its own classifier, and bridge (shared_dim x shared_dim, starting as the
  identity) carrying the shared rank-r LoRA: ``bridge(u) = W u + s B A u``. A and B have the same shape on every
  client whatever its width; on the wire they are ``shared.bridge.lora_A.weight`` / ``..lora_B..``
  (and the head's own tensors, for the baselines that share them, ``shared.classifier.*`` / ``shared.project.*``).

Every weight outside the adapter (the task head, the projection, the rest of the model) belongs to the
client's local model and never leaves it. Each architecture has its own tokenizer (its own
:class:`~fedlora.data.encoding.Encoder`).

Personal state: the weights of a client's local model live in the generic per-client store
(:class:`fedlora.client.store.PersonalStore`, ``personal/client_<id>.r<round>.safetensors``), written after
each round it trains and loaded into its architecture's one in-memory model the next time it is sampled; a
client never seen yet starts from its architecture's pretrained weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.state import AdapterState
from fedlora.client.store import PersonalStore
from fedlora.compute import to_cpu
from fedlora.config.schema import AdapterConfig, ComputeConfig, DataConfig, ModelConfig
from fedlora.data.encoding import Encoder
from fedlora.models.loading import ModelBundle, load_base_model
from fedlora.models.variants import assign_variants, layer_stack, truncate_layers, variant_label

_LAYER_INDEX = re.compile(r"\.(layers?|h)\.(\d+|last)\.")
#: the classifier attribute of the sequence-classification models fedlora loads (BERT-like, LLaMA-like)
HEAD_NAMES = ("classifier", "score")
#: the wire prefix of the representation head's tensors (each model names its head differently)
SHARED = "shared."


def head_part(key: str) -> str:
    """The name inside a model's representation head (``score.classifier.weight`` -> ``classifier.weight``;
    empty for a tensor outside the head)."""
    head, _, rest = key.partition(".")
    return rest if head in HEAD_NAMES else ""


class RepresentationHead(torch.nn.Module):
    """``logits = classifier(bridge(gelu(project(h))))``: h (..., d_model) -> (..., num_labels).

    ``project`` (shared_dim x d_model, bias) and ``classifier`` (num_labels x shared_dim, bias) are the
    client's own; ``bridge`` (shared_dim x shared_dim, no bias) starts as the identity and carries the shared
    LoRA, so the shared adapter is a residual low-rank map of the common space, ``u + s B A u`` at the start.
    """

    def __init__(self, d_model: int, shared_dim: int, num_labels: int) -> None:
        super().__init__()
        self.project = torch.nn.Linear(d_model, shared_dim)
        self.bridge = torch.nn.Linear(shared_dim, shared_dim, bias=False)
        self.classifier = torch.nn.Linear(shared_dim, num_labels)
        with torch.no_grad():
            self.bridge.weight.copy_(torch.eye(shared_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bridge(torch.nn.functional.gelu(self.project(hidden))))


def attach_representation_head(model: torch.nn.Module, shared_dim: int, seed: int) -> str:
    """Replace the model's classifier (a Linear named in :data:`HEAD_NAMES`) by a :class:`RepresentationHead`
    of the same input width and labels, initialised from ``seed``, frozen like the rest of the base model;
    returns the head's attribute name."""
    for name in HEAD_NAMES:
        old = getattr(model, name, None)
        if isinstance(old, torch.nn.Linear):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                head = RepresentationHead(old.in_features, shared_dim, old.out_features)
            head.to(device=old.weight.device, dtype=old.weight.dtype).requires_grad_(False)
            setattr(model, name, head)
            return name
    raise ValueError(
        f"model.shared_adapter 'representation': {type(model).__name__} has no linear classifier "
        f"named {' or '.join(HEAD_NAMES)}"
    )


class ClientModels:
    """Per-architecture models with the shared last-layer adapter, and every client's own weights."""

    def __init__(
        self,
        model: ModelConfig,
        adapter: AdapterConfig,
        data: DataConfig,
        compute: ComputeConfig,
        seed: int,
        num_clients: int,
        num_labels: int | None,
    ) -> None:
        """``model.variants`` architectures, ``seed`` (``federation.seed``) assigning them to ``num_clients``
        clients; each gets ``adapter``'s shared adapter, an encoder for ``data`` and ``compute``'s device."""
        #: the width of the common representation space (``model.shared_dim``)
        self.shared_dim = model.shared_dim
        self.variant_of = assign_variants(model, num_clients, seed)
        self.labels = [variant_label(model, v) for v in model.variants]
        self.bundles: list[ModelBundle] = []
        self.adapters: list[LoraAdapters] = []
        self.encoders: list[Encoder] = []
        self.pristine: list[AdapterState] = []
        self.last_layer: list[int] = []
        self.head_name: list[str] = []  # representation placement: the classifier attribute of each model
        self.store: PersonalStore | None = None  # set by whoever runs the clients (RUN_DIR/personal)
        representation = model.shared_adapter == "representation"
        names = adapter.target_modules
        if not representation and names == "all-linear":
            raise ValueError(
                "model.variants: adapter.target_modules must name the attention projections to share"
            )
        hidden = set()
        for index, variant in enumerate(model.variants):
            mcfg = model.model_copy(
                update={
                    "name": variant.name or model.name,
                    "variants": [],
                    "tiny_hidden_size": variant.tiny_hidden_size or model.tiny_hidden_size,
                }
            )
            bundle = load_base_model(mcfg, num_labels, adapter.init_seed, compute)
            if variant.num_layers:
                truncate_layers(bundle.model, variant.num_layers)
            path, layers = layer_stack(bundle.model)
            last = len(layers) - 1
            if representation:
                head = attach_representation_head(
                    bundle.model, model.shared_dim, adapter.init_seed * 7919 + index
                )
                target = rf"{re.escape(head)}\.bridge"
                self.head_name.append(head)
            else:
                target = rf"{re.escape(path)}\.{last}\.(.*\.)?({'|'.join(map(re.escape, names))})"
            adapter_cfg = adapter.model_copy(update={"target_modules": target})
            adapters = LoraAdapters(bundle.model, adapter_cfg, model.task, head_in_adapter=False)
            adapters.activate(adapter.rank)
            hidden.add(bundle.model.config.hidden_size)
            self.bundles.append(bundle)
            self.adapters.append(adapters)
            self.encoders.append(Encoder.for_data(bundle.tokenizer, model.task, data))
            self.last_layer.append(last)
            self.pristine.append(to_cpu(dict(adapters.base_parameters())))
        if len(hidden) > 1 and not representation:
            raise ValueError(
                f"model.variants: the shared last-layer adapter needs one hidden size on every client model, got "
                f"{sorted(hidden)}; set model.shared_adapter: representation (classification) for other widths"
            )

    def encoder_of(self, client_id: int) -> Encoder:
        """The tokenizer and encoding of the client's architecture."""
        return self.encoders[self.variant_of[client_id]]

    # --- the shared adapter's wire keys ---------------------------------------------------------------
    def to_shared(self, state: AdapterState) -> AdapterState:
        """Keys in their architecture-free wire form: the last-layer adapter's layer index written ``last``;
        with the representation placement, every tensor of the head (the adapter on its bridge, and its
        projection and classifier for methods that share those) under ``shared.``; other keys unchanged."""
        if self.head_name:
            heads = "|".join(map(re.escape, sorted(set(self.head_name))))
            inside = re.compile(rf"(^|\.)({heads})\.(?=(project|bridge|classifier)\.)")
            return {inside.sub(rf"\1{SHARED}", k): v for k, v in state.items()}
        return {(_LAYER_INDEX.sub(r".\1.last.", k) if ".lora_" in k else k): v for k, v in state.items()}

    def to_local(self, state: AdapterState, client_id: int) -> AdapterState:
        return self.to_variant(state, self.variant_of[client_id])

    def to_variant(self, state: AdapterState, variant: int) -> AdapterState:
        if self.head_name:
            shared = re.compile(rf"(^|\.){re.escape(SHARED)}")
            return {shared.sub(rf"\1{self.head_name[variant]}.", k): v for k, v in state.items()}
        last = self.last_layer[variant]
        return {
            (_LAYER_INDEX.sub(rf".\g<1>.{last}.", k) if ".lora_" in k else k): v for k, v in state.items()
        }

    def install(
        self, client_id: int, server_round: int, state: AdapterState
    ) -> tuple[LoraAdapters, AdapterState]:
        """Prepare the client's model and split a shared state into (its adapter part, mapped to the
        client); local-model weights in the state (the whole-model FedAvg baseline) are loaded over the
        client's own."""
        adapters = self.prepare(client_id, server_round)
        local = self.to_local(state, client_id)
        own = {k for k, _ in adapters.base_parameters()}
        weights = {k: v for k, v in local.items() if ".lora_" not in k and k in own}
        if weights:
            adapters.load_base(weights)
        return adapters, {k: v for k, v in local.items() if k not in weights}

    def initial_shared_state(self) -> AdapterState:
        return self.to_shared(self.adapters[0].initial_state())

    # --- personal weights -----------------------------------------------------------------------------
    @property
    def folder(self) -> Path | None:
        return None if self.store is None else self.store.folder

    @folder.setter
    def folder(self, path: Path) -> None:
        self.store = PersonalStore(path)

    def prepare(self, client_id: int, server_round: int) -> LoraAdapters:
        """The client's architecture with its own weights loaded (newest from before ``server_round``)."""
        variant = self.variant_of[client_id]
        adapters = self.adapters[variant]
        own = self.store.load(client_id, "", server_round) if self.store is not None else None
        adapters.load_base(own if own is not None else self.pristine[variant])
        return adapters

    def save(self, client_id: int, server_round: int) -> None:
        """Write the client's local weights for ``server_round`` (atomic; the two newest are kept)."""
        assert self.store is not None, "the client runner sets ClientModels.store"
        adapters = self.adapters[self.variant_of[client_id]]
        self.store.save(client_id, "", server_round, dict(adapters.base_parameters()))


def zero_adapter(state: AdapterState) -> AdapterState:
    """The same adapter with B = 0: the local model alone (to measure what the global adapter adds)."""
    return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.items()}
