"""Model-heterogeneous clients (pFedLoRA): one base model per architecture, each client's own weights on disk.

Where the shared adapter attaches (the design decision): LoRA on the attention projections named in
``adapter.target_modules`` (e.g. query/value, q_proj/v_proj) of each client model's LAST transformer layer.
Client architectures differ in depth (and may differ in anything below the last layer), but the last layer's
projections have the same shape whenever the hidden size and attention layout agree, so the adapter tensors
have the same shape on every client. On the wire its keys are architecture-free: the layer index is written
``last`` (``...encoder.layer.last.attention.self.query.lora_A.weight``) and each client maps them to its own
last layer. The task head (classifier or LM head) and every other weight belong to the client's local
model: they never leave the client.

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
from fedlora.config.schema import ExperimentConfig
from fedlora.models.loading import ModelBundle, load_base_model
from fedlora.models.variants import assign_variants, layer_stack, truncate_layers, variant_label

_LAYER_INDEX = re.compile(r"\.(layers?|h)\.(\d+|last)\.")


class ClientModels:
    """Per-architecture models with the shared last-layer adapter, and every client's own weights."""

    def __init__(self, cfg: ExperimentConfig, num_clients: int, num_labels: int | None) -> None:
        self.cfg = cfg
        self.variant_of = assign_variants(cfg.model, num_clients, cfg.federation.seed)
        self.labels = [variant_label(cfg.model, v) for v in cfg.model.variants]
        self.bundles: list[ModelBundle] = []
        self.adapters: list[LoraAdapters] = []
        self.pristine: list[AdapterState] = []
        self.last_layer: list[int] = []
        self.store: PersonalStore | None = None  # set by whoever runs the clients (RUN_DIR/personal)
        hidden = set()
        for variant in cfg.model.variants:
            mcfg = cfg.model.model_copy(update={"name": variant.name or cfg.model.name, "variants": []})
            bundle = load_base_model(mcfg, num_labels, cfg.adapter.init_seed, cfg.compute)
            if variant.num_layers:
                truncate_layers(bundle.model, variant.num_layers)
            path, layers = layer_stack(bundle.model)
            last = len(layers) - 1
            names = cfg.adapter.target_modules
            if names == "all-linear":
                raise ValueError(
                    "model.variants: adapter.target_modules must name the attention projections to share"
                )
            target = rf"{re.escape(path)}\.{last}\.(.*\.)?({'|'.join(map(re.escape, names))})"
            adapter_cfg = cfg.adapter.model_copy(update={"target_modules": target})
            adapters = LoraAdapters(bundle.model, adapter_cfg, cfg.model.task, head_in_adapter=False)
            adapters.activate(cfg.adapter.rank)
            hidden.add(bundle.model.config.hidden_size)
            self.bundles.append(bundle)
            self.adapters.append(adapters)
            self.last_layer.append(last)
            self.pristine.append(to_cpu(dict(adapters.base_parameters())))
        if len(hidden) > 1:
            raise ValueError(
                f"model.variants: the shared adapter needs one hidden size on every client model, got {sorted(hidden)}"
            )

    # --- the shared adapter's wire keys ---------------------------------------------------------------
    @staticmethod
    def to_shared(state: AdapterState) -> AdapterState:
        """Adapter keys with the layer index written ``last``; other keys (local weights) unchanged."""
        return {(_LAYER_INDEX.sub(r".\1.last.", k) if ".lora_" in k else k): v for k, v in state.items()}

    def to_local(self, state: AdapterState, client_id: int) -> AdapterState:
        return self.to_variant(state, self.variant_of[client_id])

    def to_variant(self, state: AdapterState, variant: int) -> AdapterState:
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
