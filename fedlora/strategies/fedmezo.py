"""FedMeZO (Ling et al., 2024): zeroth-order local training, FedAvg, personalised client learning rates.

Clients run MeZO steps on the adapter (:mod:`fedlora.client.zeroth_order`); the server averages the
adapters weighted by examples (p_i = n_i / sum n_j). With ``upload: seeds`` a client sends its steps
(seeds, projected gradients, learning rates) instead of its adapter and the server replays them from the
round's start adapter, bit for bit.

Client learning rate eta_i = eta + Delta * u_i with u_i in [-1, 1], eta = ``client.lr``; Delta is ``lr_delta``
(absolute, the reference code's spread) or, when that is unset, ``lr_spread`` x eta (relative). With
d_i the client's signal minus the mean signal over this round's sampled clients that have one,
u_i = d_i / max_j |d_j|:

- ``frozen``: u_i = 0;
- ``random``: u_i ~ U[-1, 1], seeded by (run seed, round, client);
- ``round-wise``: signal L_i, the client's training loss in the last round it took part in;
- ``five-round``: signal mean(L_i over its last five rounds); with ``lr_rules: reference`` (default) only once
  the client has five rounds of history (before that it keeps eta, as the reference does); with
  ``lr_rules: fedlora`` over whatever of the last five rounds it took part in (from its second round on);
- ``model-diff``: signal the drift of its update (update = adapter after - adapter before) from the mean update
  of its last round. ``reference``: D_i = sum_k ||u_{i,k} - (1/K) sum_j u_{j,k}||_F over tensors k, against the
  unweighted mean of the K clients; ``fedlora``: D_i = ||u_i - sum_j p_j u_j|| with the whole adapter as one
  vector and the example-weighted mean.

Clients with a higher loss or a larger drift get a larger rate; a client with no history (or when all d are
0) gets eta. Works for any number of clients and for partial participation (the reference code assumed 3).
"""

from __future__ import annotations

import math
import random
from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field

from fedlora.adapters.state import AdapterState
from fedlora.client.hooks import ClientHooks
from fedlora.client.zeroth_order import (
    WEIGHT_DECAY_KEY,
    ZerothOrder,
    check_steps_record,
    replay,
)
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    Review,
    RoundResults,
    ServerSetup,
    ServerState,
    Strategy,
    StrategyOptions,
    check_example_count,
    check_same_layout,
    example_weights,
    weighted_average,
)
from fedlora.strategies.registry import register_strategy

#: the state's fact: {client: [[round, train loss, drift or nan], ...]}
HISTORY = "history"


class FedMeZOOptions(StrategyOptions):
    eps: float = Field(1e-3, gt=0.0, description="perturbation scale of the two-point estimate")
    perturbations: int = Field(1, ge=1, description="perturbations per step (their estimates are averaged)")
    lr_strategy: Literal["frozen", "random", "round-wise", "five-round", "model-diff"] = "frozen"
    lr_rules: Literal["reference", "fedlora"] = Field(
        "reference",
        description="five-round and model-diff as the reference code defines them, or fedlora's variants",
    )
    lr_spread: float = Field(
        0.5,
        ge=0.0,
        lt=1.0,
        description="Delta / eta: client rates in eta * (1 +- spread) (when lr_delta is unset)",
    )
    lr_delta: float | None = Field(
        None, ge=0.0, description="absolute Delta: client rates in eta +- Delta (the reference's spread)"
    )
    upload: Literal["weights", "seeds"] = "weights"
    skip_nan_steps: bool = Field(
        True,
        description="a step whose loss is not finite moves nothing (the reference MeZOTrainer skips such a batch)",
    )
    full_parameters: bool = Field(
        False, description="tune every weight of the base model (small models), not a LoRA adapter"
    )


@register_strategy
class FedMeZO(Strategy[FedMeZOOptions]):
    """FedAvg of zeroth-order-trained adapters with personalised client learning rates."""

    name = "fedmezo"
    Options: ClassVar[type[StrategyOptions]] = FedMeZOOptions

    def __init__(self, options: FedMeZOOptions | None = None) -> None:
        super().__init__(options)
        self.trains_full_model = self.options.full_parameters

    @staticmethod
    def history(state: ServerState, client_id: int) -> list[tuple[int, float, float]]:
        """The client's [(round, train loss, drift or nan)] so far (the state's ``history`` fact)."""
        return [
            (int(r), float(loss), float(d)) for r, loss, d in state.facts[HISTORY].get(str(client_id), [])
        ]

    # --- learning rates -------------------------------------------------------------------------------
    def signal(self, state: ServerState, client_id: int, server_round: int) -> float | None:
        """The client's d-signal input for the configured strategy (None = no history)."""
        entries = self.history(state, client_id)
        kind = self.options.lr_strategy
        if not entries:
            return None
        if kind == "round-wise":
            return entries[-1][1]
        if kind == "five-round":
            if self.options.lr_rules == "reference":
                recent = [loss for _, loss, _ in entries[-5:]] if len(entries) >= 5 else []
            else:
                recent = [loss for r, loss, _ in entries if server_round - 5 <= r < server_round]
            return sum(recent) / len(recent) if recent else None
        if kind == "model-diff":
            drift = entries[-1][2]
            return None if math.isnan(drift) else drift
        return None

    def lr_directions(self, state: ServerState, server_round: int, client_ids: list[int]) -> dict[int, float]:
        """u_i in [-1, 1] for each sampled client (see the module docstring); 0 = the base rate."""
        kind = self.options.lr_strategy
        if kind == "frozen":
            return dict.fromkeys(client_ids, 0.0)
        if kind == "random":
            return {
                c: random.Random(f"{self.setup.seed}/lr/{server_round}/{c}").uniform(-1, 1)
                for c in client_ids
            }
        signals = {c: self.signal(state, c, server_round) for c in client_ids}
        known = {c: v for c, v in signals.items() if v is not None}
        directions = dict.fromkeys(client_ids, 0.0)
        if not known:
            return directions
        mean = sum(known.values()) / len(known)
        d = {c: v - mean for c, v in known.items()}
        top = max(abs(x) for x in d.values())
        if top > 0:
            directions.update({c: x / top for c, x in d.items()})
        return directions

    def lr_settings(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, dict[str, float]]:
        """Each client's rate as a setting: ``lr_offset`` = Delta u_i (absolute ``lr_delta``) or
        ``lr_scale`` = 1 + spread u_i (relative); empty for a client at the base rate."""
        opts = self.options
        directions = self.lr_directions(state, server_round, client_ids)
        if opts.lr_delta is not None:
            return {c: {"lr_offset": opts.lr_delta * u} if u else {} for c, u in directions.items()}
        return {c: {"lr_scale": 1.0 + opts.lr_spread * u} if u else {} for c, u in directions.items()}

    def initialize(self, setup: ServerSetup) -> ServerState:
        return super().initialize(setup).evolve(facts={HISTORY: {}})

    def client_hooks(self, state: ServerState) -> list[ClientHooks]:
        opts = self.options
        return [
            ZerothOrder(
                eps=opts.eps,
                perturbations=opts.perturbations,
                upload=opts.upload,
                full_model=self.trains_full_model,
                skip_nonfinite=opts.skip_nan_steps,
            )
        ]

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        """Zeroth-order steps at each client's personalised rate eta + Delta u_i."""
        settings = self.lr_settings(state, server_round, client_ids)
        hooks = self.client_hooks(state)
        payload = state.adapter
        return {c: ClientInstruction(payload, settings[c], hooks) for c in client_ids}

    # --- replies --------------------------------------------------------------------------------------
    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        """With ``upload: seeds`` a reply is a steps record: it is replayed from what the client was sent,
        and the accepted reply carries the replayed weights (what :meth:`aggregate` averages)."""
        if self.options.upload == "weights":
            return super().review(state, server_round, results)
        accepted, rejected = [], []
        for instruction, reply in results:
            record = reply.payload
            reason = check_example_count(self.setup, reply) or check_steps_record(
                record, self.options.perturbations
            )
            if reason is None:
                weight_decay = float(record[WEIGHT_DECAY_KEY])
                replayed = replay(instruction.payload, record, self.options.eps, weight_decay)
                reason = check_same_layout(instruction.payload, replayed)
            if reason is None:
                accepted.append(replace(reply, payload=replayed))
            else:
                rejected.append((reply.client_id, reason))
        return Review(state, accepted, rejected)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        start = state.adapter
        states = [r.payload for r in replies]
        weights = example_weights(replies)
        history = {c: list(entries) for c, entries in state.facts[HISTORY].items()}
        for reply, drift in zip(replies, self.drifts(start, states, weights), strict=True):
            loss = float(reply.metrics.get("train_loss", float("nan")))
            history.setdefault(str(reply.client_id), []).append([server_round, loss, drift])
        return state.evolve({GLOBAL: weighted_average(states, weights)}, {HISTORY: history})

    def drifts(self, start: AdapterState, states: list[AdapterState], weights: list[float]) -> list[float]:
        """Each client's D_i for ``model-diff`` (module docstring), from the updates u_i = state_i - start."""
        updates = [{k: (s[k] - start[k]).double() for k in start} for s in states]
        if self.options.lr_rules == "reference":
            mean = {k: sum(u[k] for u in updates) / len(updates) for k in start}
            return [sum(float((u[k] - mean[k]).norm()) for k in start) for u in updates]
        flat = [torch.cat([u[k].flatten() for k in start]) for u in updates]
        weighted_mean = sum(w * f for w, f in zip(weights, flat, strict=True))
        return [float((f - weighted_mean).norm()) for f in flat]
