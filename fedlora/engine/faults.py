"""Failure injection for the embedded engine (``faults`` in the config), seeded per (run, round, attempt).

Each sampled client independently (one uniform draw u): u < dropout -> it never replies; next ``straggler``
-> its reply comes after the round deadline and is discarded; next ``corrupt`` -> it replies with a
corrupted update of one of ``kinds``:

- ``nan`` / ``inf``: one value of its first tensor replaced;
- ``shape``: its first tensor loses a column;
- ``rank``: every LoRA module gets one more rank (a row of A, a column of B) than it was given;
- ``norm``: every tensor multiplied by 1e6 (an absurd update norm).

The server must reject every corrupted reply with a reason (the strategy's checks and the engine's
update-norm checks), log it, and aggregate the rest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from fedlora.adapters.ranks import lora_key_parts
from fedlora.adapters.state import AdapterState
from fedlora.config.schema import FaultsConfig

DROPOUT, STRAGGLER, CORRUPT = "dropout", "straggler", "corrupt"


@dataclass(frozen=True)
class Fault:
    kind: str  # dropout | straggler | corrupt
    corruption: str | None = None


def plan_faults(
    cfg: FaultsConfig, seed: int, server_round: int, attempt: int, clients: list[int]
) -> dict[int, Fault]:
    """Which sampled clients fail this attempt, and how."""
    if not (cfg.dropout or cfg.straggler or cfg.corrupt):
        return {}
    rng = random.Random(f"{seed}/faults/{cfg.seed}/{server_round}/{attempt}")
    plan: dict[int, Fault] = {}
    for client in clients:
        u = rng.random()
        if u < cfg.dropout:
            plan[client] = Fault(DROPOUT)
        elif u < cfg.dropout + cfg.straggler:
            plan[client] = Fault(STRAGGLER)
        elif u < cfg.dropout + cfg.straggler + cfg.corrupt:
            plan[client] = Fault(CORRUPT, rng.choice(list(cfg.kinds)))
    return plan


def corrupt(payload: AdapterState, kind: str) -> AdapterState:
    """A corrupted copy of a reply payload (see the module docstring for the kinds)."""
    out = {k: v.clone() for k, v in payload.items()}
    first = next(k for k, v in out.items() if v.is_floating_point() and v.ndim >= 1)
    if kind == "nan":
        out[first].view(-1)[0] = float("nan")
    elif kind == "inf":
        out[first].view(-1)[0] = float("inf")
    elif kind == "shape":
        out[first] = out[first][..., :-1].clone() if out[first].ndim > 1 else out[first][:-1].clone()
    elif kind == "rank":
        for key, value in list(out.items()):
            parts = lora_key_parts(key)
            if parts is not None and parts[1] == "A":
                out[key] = torch.cat([value, value[:1]], dim=0)
            elif parts is not None:
                out[key] = torch.cat([value, value[:, :1]], dim=1)
    elif kind == "norm":
        out = {k: v * 1e6 if v.is_floating_point() else v for k, v in out.items()}
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return out
