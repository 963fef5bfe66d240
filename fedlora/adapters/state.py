"""Adapter states: a flat dict of named tensors, and its wire form (safetensors bytes, never pickle).

Keys are PEFT's own (``base_model.model.<module path>.lora_A.weight``, adapter name stripped), so a state is
exactly what goes into ``adapter_model.safetensors``. The rank lives only in the tensor shapes
(``lora_A``: r x k, ``lora_B``: d x r), so clients of different ranks use the same format.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

AdapterState = dict[str, torch.Tensor]


def to_bytes(state: AdapterState) -> bytes:
    """Serialise a state as safetensors bytes (what crosses the wire)."""
    return st_save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def from_bytes(data: bytes) -> AdapterState:
    return st_load(data)


def wire_size(state: AdapterState) -> int:
    """Bytes of the safetensors serialisation of ``state`` (header included)."""
    return len(to_bytes(state))


def clone_state(state: AdapterState) -> AdapterState:
    return {k: v.detach().clone() for k, v in state.items()}


def lora_ranks(state: AdapterState) -> dict[str, int]:
    """Module path -> LoRA rank, read from the ``lora_A`` shapes."""
    return {k.rsplit(".lora_A", 1)[0]: v.shape[0] for k, v in state.items() if ".lora_A" in k}
