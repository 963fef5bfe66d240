"""Client model variants (model-heterogeneous federations): the same family at different depths, or other
models with the same hidden size, each client assigned one, seeded."""

from __future__ import annotations

import random

import torch

from fedlora.adapters.ranks import counts_from_shares
from fedlora.config.schema import ModelConfig, ModelVariant

#: where the stack of transformer layers lives in the model families fedlora loads
LAYER_STACKS = ("model.layers", "bert.encoder.layer", "encoder.layer", "transformer.h", "model.model.layers")


def variant_label(model: ModelConfig, variant: ModelVariant) -> str:
    name = variant.name or model.name
    return f"{name}[:{variant.num_layers}]" if variant.num_layers else name


def assign_variants(model: ModelConfig, num_clients: int, seed: int) -> list[int]:
    """Index into ``model.variants`` for each client: counts from the shares, dealt in a seeded order."""
    counts = counts_from_shares([v.share for v in model.variants], num_clients)
    pool = [i for i, n in enumerate(counts) for _ in range(n)]
    random.Random(f"{seed}/variants").shuffle(pool)
    return pool


def layer_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of transformer layers and its dotted path."""
    for path in LAYER_STACKS:
        node: object = model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, torch.nn.ModuleList):
            return path, node
    raise ValueError(
        f"{type(model).__name__}: no transformer layer stack found (looked at {', '.join(LAYER_STACKS)})"
    )


def truncate_layers(model: torch.nn.Module, num_layers: int) -> torch.nn.Module:
    """Keep the first ``num_layers`` transformer layers (in place); the config follows."""
    path, layers = layer_stack(model)
    if num_layers > len(layers):
        raise ValueError(f"model.variants: num_layers {num_layers} is above the model's {len(layers)} layers")
    parent = model
    *head, last = path.split(".")
    for part in head:
        parent = getattr(parent, part)
    setattr(parent, last, torch.nn.ModuleList(list(layers)[:num_layers]))
    config = getattr(model, "config", None)
    if config is not None:
        config.num_hidden_layers = num_layers
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:num_layers]
    return model
