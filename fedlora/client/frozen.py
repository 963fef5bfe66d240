"""A generic client hook: train one LoRA factor, keep the other frozen and unsent.

``FreezeFactor(factor="A")``: every ``lora_A`` tensor is neither trained nor sent back (the reply holds the B
factors and any task head); ``factor="B"`` the other way round. Unlike FFA-LoRA's frozen A (fixed at its
seeded initialisation for the whole run), the frozen factor here is whatever the payload holds this round,
so a method can alternate (RoLoRA) or re-base it between rounds (FedSVD). ``freeze_heads``: a task head (every
tensor that is not a LoRA factor) is frozen and unsent too (FedSVD's reference freezes its classifier).
"""

from __future__ import annotations

from typing import Literal

from fedlora.adapters.ranks import lora_key_parts
from fedlora.client.hooks import ClientHooks, register_client_hooks


def is_factor(key: str, factor: str) -> bool:
    """Whether ``key`` is a LoRA ``factor`` ("A" or "B") tensor."""
    parts = lora_key_parts(key)
    return parts is not None and parts[1] == factor


@register_client_hooks
class FreezeFactor(ClientHooks):
    """Train the other factor only; the frozen one is neither updated nor sent."""

    kind = "freeze-factor"
    batchable = True  # no loss term, no phase of its own
    factor: Literal["A", "B"]
    freeze_heads: bool = False

    def frozen(self, key: str) -> bool:
        return is_factor(key, self.factor) or (self.freeze_heads and lora_key_parts(key) is None)
