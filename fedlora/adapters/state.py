"""Adapter states: a flat dict of named tensors, and its wire form (safetensors bytes, never pickle).

Keys are PEFT's own (``base_model.model.<module path>.lora_A.weight``, adapter name stripped), so a state is
exactly what goes into ``adapter_model.safetensors``. The rank lives only in the tensor shapes
(``lora_A``: r x k, ``lora_B``: d x r), so clients of different ranks use the same format.
"""

from __future__ import annotations

import hashlib

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


def state_digest(state: AdapterState) -> str:
    """SHA-256 (hex) of the tensors' names, dtypes, shapes and bytes, in sorted name order.

    Two parties that must hold the same tensors (FFA-LoRA's frozen A on the server and on every client)
    compare digests instead of sending the tensors.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def same_shapes(sent: AdapterState, got: AdapterState) -> bool:
    """Whether ``got`` is an update of ``sent`` (same tensor names and shapes); seed records and pruned
    replies are not."""
    return sent.keys() == got.keys() and all(got[k].shape == v.shape for k, v in sent.items())


def update_norm(sent: AdapterState, got: AdapterState) -> float:
    """||got - sent|| over all tensors as one vector (float64)."""
    return float(sum(float((got[k].double() - sent[k].double()).pow(2).sum()) for k in sent) ** 0.5)


def clip_update(sent: AdapterState, got: AdapterState, factor: float) -> AdapterState:
    """sent + factor * (got - sent), tensor by tensor."""
    return {
        k: (sent[k].double() + factor * (got[k].double() - sent[k].double())).to(got[k].dtype) for k in got
    }
