"""Adapters: LoRA slots on the shared base model (PEFT) and the named-tensor state format."""

from fedlora.adapters.lora import LoraAdapters
from fedlora.adapters.state import AdapterState, clone_state, from_bytes, lora_ranks, to_bytes, wire_size

__all__ = ["AdapterState", "LoraAdapters", "clone_state", "from_bytes", "lora_ranks", "to_bytes", "wire_size"]
