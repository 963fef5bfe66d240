"""The messages between server and clients, the same whatever carries them (in process, worker processes,
Flower): a :class:`ClientInstruction` down, a :class:`ClientReply` up.

Tensors travel as safetensors bytes or Flower ArrayRecords; everything else as JSON
(:func:`plan_to_json` / :func:`plan_from_json`: the generic settings and the method's hook objects). Never
pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks, hooks_from_json


@dataclass
class ClientInstruction:
    """What the server sends one client for one round: the tensors to start from, overrides of the generic
    local-training settings (``optimizer``, ``lr_scale``, ``privacy``...: JSON values), the method's client
    hooks (typed, JSON on the wire), and how the reply's tensors travel (``federation.wire_dtype`` and
    ``wire_error_feedback``: :mod:`fedlora.adapters.wire`; the payload itself may arrive in its wire form)."""

    payload: AdapterState
    settings: dict[str, Any] = field(default_factory=dict)
    hooks: list[ClientHooks] = field(default_factory=list)
    wire_dtype: str = "fp32"
    wire_error_feedback: bool = False


@dataclass
class ClientReply:
    """What one client sends back."""

    client_id: int
    payload: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    #: the bytes the client sent, when the transport counted them itself (secure aggregation's protocol
    #: sends more than the payload); None: the engine counts the payload as it travelled
    bytes_sent: int | None = None


def plan_to_json(instruction: ClientInstruction) -> str:
    """The instruction without its tensors, as JSON."""
    plan: dict[str, Any] = {
        "settings": instruction.settings,
        "hooks": [h.to_json() for h in instruction.hooks],
    }
    if instruction.wire_dtype != "fp32":
        plan["wire"] = instruction.wire_dtype
        plan["wire_error_feedback"] = instruction.wire_error_feedback
    return json.dumps(plan, sort_keys=True)


def plan_from_json(text: str, payload: AdapterState) -> ClientInstruction:
    """Rebuild an instruction from :func:`plan_to_json` and its tensors (unknown hook kinds are errors)."""
    plan = json.loads(text)
    wire, feedback = str(plan.get("wire", "fp32")), bool(plan.get("wire_error_feedback", False))
    return ClientInstruction(payload, dict(plan["settings"]), hooks_from_json(plan["hooks"]), wire, feedback)


# The wire codec every transport that crosses a process boundary uses (worker processes, Flower messages):
# tensors travel as the transport's own tensor container (safetensors bytes, Flower's ArrayRecord), the rest
# as these flat JSON-able headers.


#: the request key saying that the node trains the client the message names (Flower's ``assigned`` routing)
ASSIGNED_KEY = "assigned-client"


def request_header(
    server_round: int, client_id: int, instruction: ClientInstruction, assigned: bool = False
) -> dict[str, Any]:
    """The scalar side of a train request: round, client and the plan (:func:`plan_to_json`); ``assigned``:
    the node trains the client the message names (:data:`ASSIGNED_KEY`)."""
    header: dict[str, Any] = {"round": server_round, "client": client_id, "plan": plan_to_json(instruction)}
    if assigned:
        header[ASSIGNED_KEY] = True
    return header


def is_assigned(header: Mapping[str, Any]) -> bool:
    """Whether a :func:`request_header` says the node trains the client it names."""
    return bool(header.get(ASSIGNED_KEY, False))


def read_request(header: Mapping[str, Any], payload: AdapterState) -> tuple[int, int, ClientInstruction]:
    """(round, client, instruction) from :func:`request_header` and the request's tensors."""
    return int(header["round"]), int(header["client"]), plan_from_json(str(header["plan"]), payload)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def wire_metrics(metrics: Mapping[str, Any]) -> dict[str, int | float | list[float]]:
    """The metrics a reply carries over the wire: numbers and lists of numbers (``step_losses``), as a Flower
    ``MetricRecord`` holds them; no booleans, text or nested values."""
    out: dict[str, int | float | list[float]] = {}
    for key, value in metrics.items():
        if is_number(value):
            out[key] = value
        elif isinstance(value, list) and value and all(is_number(v) for v in value):
            out[key] = [float(v) for v in value]
    return out


def reply_header(reply: ClientReply) -> dict[str, int]:
    """The scalar side of a reply besides its metrics: the number of examples it trained on."""
    return {"num-examples": reply.num_examples}


def read_reply(
    client_id: int, header: Mapping[str, Any], payload: AdapterState, metrics: Mapping[str, Any]
) -> ClientReply:
    """A :class:`ClientReply` from :func:`reply_header`, its tensors and its :func:`wire_metrics`."""
    return ClientReply(client_id, payload, int(header["num-examples"]), dict(metrics))
