"""A generic client hook: clip the client's update to a norm before it leaves (client-side clipping).

``ClipUpdate(norm=C)``: with x_t the payload the client started from and x its trained tensors (the ones it
sends back, all as one vector), the reply is

    x_t + (x - x_t) * min(1, C / ||x - x_t||_2)

(Flower's ``fixedclipping_mod``; McMahan et al. 2018's per-client clipping, done on the client). Client-level
DP under secure aggregation puts it on every client (:mod:`fedlora.strategies.client_privacy`): the server
sees only the sum, so it cannot clip. It reports ``clipped`` (1 when the update was scaled down), not the
norm. ``equal_weight``: the reply weighs as every other in the round's sum (1 / m, DP-FedAvg's weighting).
"""

from __future__ import annotations

from typing import Any, ClassVar

from fedlora.adapters.state import AdapterState, clip_update, update_norm
from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks

#: the scratch key of the state the round started from
START = "clip-update-start"


@register_client_hooks
class ClipUpdate(ClientHooks):
    """Scale the reply's update (reply - what the client started from) down to ``norm``."""

    kind = "clip-update"
    batchable = True  # no loss term, no phase of its own
    equal_weight: ClassVar[bool] = True
    norm: float

    def before_training(self, ctx: ClientContext) -> dict[str, float]:
        ctx.scratch[START] = {k: v.detach().clone() for k, v in ctx.adapters.state().items()}
        return {}

    def reply_state(self, ctx: ClientContext, state: AdapterState, metrics: dict[str, Any]) -> AdapterState:
        start = {k: v for k, v in ctx.scratch[START].items() if k in state}
        if start.keys() != state.keys():
            raise ValueError("clip-update: the reply holds tensors the client did not start from")
        size = update_norm(start, state)
        metrics["clipped"] = float(size > self.norm)
        return clip_update(start, state, min(1.0, self.norm / size) if size > 0 else 1.0)
