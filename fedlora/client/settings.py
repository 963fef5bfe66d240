"""The generic local-training settings of one client for one round (no method-specific fields), and the
round's learning-rate rule. A leaf of ``fedlora.client``: hooks, the trainer and the protocol all read it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class DPSettings:
    """One client's DP-SGD plan for a round (set by the privacy wrapper from its ledger)."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    sampling: Literal["poisson", "shuffle"] = "poisson"
    sample_rate: float | None = None


@dataclass(frozen=True)
class LocalTrainingSettings:
    """Resolved generic local-training settings of one client for one round (no method-specific fields)."""

    optimizer: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    local_steps: int | None = 10
    local_epochs: float | None = None
    batch_size: int = 4
    grad_clip: float | None = 1.0
    #: multiplies lr (e.g. FedMeZO's personalised client learning rates, relative spread)
    lr_scale: float = 1.0
    #: added to the round's lr (e.g. FedMeZO's personalised client learning rates, absolute spread)
    lr_offset: float = 0.0
    privacy: DPSettings | None = None
    #: autocast of the forward pass (``compute.precision``): fp32, bf16 or fp16 (with a gradient scaler)
    precision: str = "fp32"
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    #: round t trains at lr * lr_decay^(t - 1)
    lr_decay: float = 1.0
    #: cosine annealing across rounds from lr to lr_min (FlowerTune's learning-rate-max/min), None = off
    lr_min: float | None = None
    #: the schedule's length T (``federation.rounds``)
    total_rounds: int = 1
    gradient_accumulation_steps: int = 1


#: the generic settings a strategy may override per client in ``ClientInstruction.settings``
OVERRIDABLE: tuple[str, ...] = ("optimizer", "lr", "weight_decay", "momentum", "local_steps", "local_epochs")
OVERRIDABLE += ("batch_size", "grad_clip", "lr_scale", "lr_offset")


def round_lr(settings: LocalTrainingSettings, server_round: int) -> float:
    """The round's base learning rate before lr_scale / lr_offset: ``lr * lr_decay^(t - 1)``, or with
    ``lr_min`` FlowerTune's ``cosine_annealing(t, T, lr, lr_min)`` = lr_min + (lr - lr_min)(1 + cos(pi t/T))/2."""
    if settings.lr_min is not None:
        progress = min(server_round, settings.total_rounds) / max(settings.total_rounds, 1)
        return settings.lr_min + 0.5 * (settings.lr - settings.lr_min) * (1 + math.cos(math.pi * progress))
    return settings.lr * settings.lr_decay ** max(server_round - 1, 0)


def round_settings(settings: LocalTrainingSettings, server_round: int) -> LocalTrainingSettings:
    """The round's learning rate folded in: :func:`round_lr` * lr_scale + lr_offset."""
    base = round_lr(settings, server_round)
    if base == settings.lr and settings.lr_scale == 1.0 and settings.lr_offset == 0.0:
        return settings
    factor = settings.lr_scale * base / settings.lr
    lr = base * settings.lr_scale + settings.lr_offset
    if lr <= 0:
        raise ValueError(
            f"round {server_round}: learning rate {settings.lr:g} x {factor:g} + offset {settings.lr_offset:g}"
            f" = {lr:g} <= 0; lower the strategy's learning-rate spread (e.g. strategy.options.lr_delta)"
        )
    return replace(settings, lr=lr, lr_scale=1.0, lr_decay=1.0, lr_offset=0.0, lr_min=None)
