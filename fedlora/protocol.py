"""The messages between server and clients, the same whatever carries them (in process, worker processes,
Flower): a :class:`ClientInstruction` down, a :class:`ClientReply` up.

Tensors travel as safetensors bytes or Flower ArrayRecords; everything else as JSON
(:func:`plan_to_json` / :func:`plan_from_json`: the generic settings and the method's hook objects). Never
pickle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks, hooks_from_json


@dataclass
class ClientInstruction:
    """What the server sends one client for one round: the tensors to start from, overrides of the generic
    local-training settings (``optimizer``, ``lr_scale``, ``privacy``...: JSON values), and the method's client
    hooks (typed, JSON on the wire)."""

    payload: AdapterState
    settings: dict[str, Any] = field(default_factory=dict)
    hooks: list[ClientHooks] = field(default_factory=list)


@dataclass
class ClientReply:
    """What one client sends back."""

    client_id: int
    payload: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def plan_to_json(instruction: ClientInstruction) -> str:
    """The instruction without its tensors, as JSON."""
    return json.dumps(
        {"settings": instruction.settings, "hooks": [h.to_json() for h in instruction.hooks]}, sort_keys=True
    )


def plan_from_json(text: str, payload: AdapterState) -> ClientInstruction:
    """Rebuild an instruction from :func:`plan_to_json` and its tensors (unknown hook kinds are errors)."""
    plan = json.loads(text)
    return ClientInstruction(payload, dict(plan["settings"]), hooks_from_json(plan["hooks"]))
