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
    ClientInstruction,
    ClientReply,
    Strategy,
    StrategyOptions,
    check_example_count,
    check_same_layout,
    example_weights,
    weighted_average,
)
from fedlora.strategies.registry import register_strategy

HISTORY_KEY = "__fedmezo_history__"


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
        # client -> [(round, train loss, drift or nan)]
        self.history: dict[int, list[tuple[int, float, float]]] = {}
        self._replayed: dict[int, AdapterState] = {}

    # --- learning rates -------------------------------------------------------------------------------
    def signal(self, client_id: int, server_round: int) -> float | None:
        """The client's d-signal input for the configured strategy (None = no history)."""
        entries = self.history.get(client_id, [])
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

    def lr_directions(self, server_round: int, client_ids: list[int]) -> dict[int, float]:
        """u_i in [-1, 1] for each sampled client (see the module docstring); 0 = the base rate."""
        kind = self.options.lr_strategy
        if kind == "frozen":
            return dict.fromkeys(client_ids, 0.0)
        if kind == "random":
            return {c: random.Random(f"{self.seed}/lr/{server_round}/{c}").uniform(-1, 1) for c in client_ids}
        signals = {c: self.signal(c, server_round) for c in client_ids}
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

    def lr_settings(self, server_round: int, client_ids: list[int]) -> dict[int, dict[str, float]]:
        """Each client's rate as a setting: ``lr_offset`` = Delta u_i (absolute ``lr_delta``) or
        ``lr_scale`` = 1 + spread u_i (relative); empty for a client at the base rate."""
        opts = self.options
        directions = self.lr_directions(server_round, client_ids)
        if opts.lr_delta is not None:
            return {c: {"lr_offset": opts.lr_delta * u} if u else {} for c, u in directions.items()}
        return {c: {"lr_scale": 1.0 + opts.lr_spread * u} if u else {} for c, u in directions.items()}

    def client_hooks(self) -> list[ClientHooks]:
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

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        """Zeroth-order steps at each client's personalised rate eta + Delta u_i."""
        settings = self.lr_settings(server_round, client_ids)
        hooks = self.client_hooks()
        return {c: ClientInstruction(self.global_state, settings[c], hooks) for c in client_ids}

    # --- replies --------------------------------------------------------------------------------------
    def validate_reply(self, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        if self.options.upload == "weights":
            return super().validate_reply(instruction, reply)
        record = reply.payload
        n = self.options.perturbations
        reason = check_example_count(self, reply) or check_steps_record(record, n)
        if reason is not None:
            return reason
        state = replay(
            instruction.payload,
            record,
            self.options.eps,
            float(record[WEIGHT_DECAY_KEY]),
        )
        reason = check_same_layout(instruction.payload, state)
        if reason is None:
            self._replayed[reply.client_id] = state
        return reason

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        start = self.global_state
        states = [
            self._replayed.pop(r.client_id) if self.options.upload == "seeds" else r.payload for r in replies
        ]
        self._replayed.clear()
        weights = example_weights(replies)
        self.global_state = weighted_average(states, weights)
        for reply, drift in zip(replies, self.drifts(start, states, weights), strict=True):
            loss = float(reply.metrics.get("train_loss", float("nan")))
            self.history.setdefault(reply.client_id, []).append((server_round, loss, drift))
        return self.global_state

    def drifts(self, start: AdapterState, states: list[AdapterState], weights: list[float]) -> list[float]:
        """Each client's D_i for ``model-diff`` (module docstring), from the updates u_i = state_i - start."""
        updates = [{k: (s[k] - start[k]).double() for k in start} for s in states]
        if self.options.lr_rules == "reference":
            mean = {k: sum(u[k] for u in updates) / len(updates) for k in start}
            return [sum(float((u[k] - mean[k]).norm()) for k in start) for u in updates]
        flat = [torch.cat([u[k].flatten() for k in start]) for u in updates]
        weighted_mean = sum(w * f for w, f in zip(weights, flat, strict=True))
        return [float((f - weighted_mean).norm()) for f in flat]

    # --- resume ---------------------------------------------------------------------------------------
    def server_state(self) -> dict[str, torch.Tensor]:
        rows = [
            [c, r, loss, drift] for c, entries in sorted(self.history.items()) for r, loss, drift in entries
        ]
        table = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
        return {**super().server_state(), HISTORY_KEY: table}

    def load_server_state(self, tensors: dict[str, torch.Tensor]) -> None:
        tensors = dict(tensors)
        table = tensors.pop(HISTORY_KEY, None)
        super().load_server_state(tensors)
        self.history = {}
        if table is not None:
            for c, r, loss, drift in table.tolist():
                self.history.setdefault(int(c), []).append((int(r), loss, drift))
