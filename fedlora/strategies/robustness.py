"""Robustness as strategy wrappers (any strategy, any engine): update-norm screening and clipping, and
robust aggregation rules for methods that average.

Screening. For a reply that is an update of what the client was sent (same tensor names and shapes), its
norm is u = ||reply - sent|| over all tensors as one vector. It is rejected when u > ``max_update_norm``, or
when u > ``max_update_norm_ratio`` x r for any reference r available:

- the median of the last ``update_norm_history`` accepted update norms (3 or more; kept across rounds and
  in the checkpoints), so one round of mostly corrupted replies cannot move the bar;
- ||sent||, the norm of what the client started from (a x1e6 update is caught in round 1);
- the round's median when it has 3 or more such replies, or its lower median when there is no other
  reference (2 replies: the smaller one).

``clip_update_norm`` then scales the accepted updates down to that norm (norm-bounded averaging).

Robust aggregation (:class:`RobustAggregation`, for methods whose aggregate is an average of the payloads):
the coordinate-wise median, or the trimmed mean (``trim_fraction`` of the values dropped at each end), of
the accepted payloads, unweighted (so an inflated example count buys nothing); the method then aggregates
that single combined reply.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from fedlora.adapters.state import AdapterState
from fedlora.config.schema import FederationConfig
from fedlora.errors import ConfigError
from fedlora.strategies.base import ClientInstruction, ClientReply, Strategy
from fedlora.strategies.wrappers import StrategyWrapper

log = logging.getLogger(__name__)


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


class UpdateNormScreen(StrategyWrapper):
    """Rejects updates by absolute norm and by ratio to the history, the start point and the round;
    clips the accepted ones."""

    _own = frozenset({"inner", "limits", "_sent", "_start_norms", "history"})

    def __init__(self, inner: Strategy, limits: FederationConfig) -> None:
        super().__init__(inner)
        self.limits = limits
        # client -> (what it was sent, ||sent||, update norm)
        self._sent: dict[int, tuple[AdapterState, float, float]] = {}
        self._start_norms: dict[int, float] = {}  # id(payload) -> its norm (clients often share one)
        self.history: list[float] = []  # accepted update norms, newest last

    def configure(self, server_round: int, client_ids: list[int]) -> dict[int, ClientInstruction]:
        self._sent, self._start_norms = {}, {}
        return self.inner.configure(server_round, client_ids)

    def validate_reply(self, instruction: ClientInstruction, reply: ClientReply) -> str | None:
        reason = self.inner.validate_reply(instruction, reply)
        if reason is None and same_shapes(instruction.payload, reply.payload):
            norm = update_norm(instruction.payload, reply.payload)
            limit = self.limits.max_update_norm
            if limit is not None and norm > limit:
                return f"update norm {norm:.3g} above federation.max_update_norm ({limit})"
            key = id(instruction.payload)
            if key not in self._start_norms:
                squares = sum(float(v.double().pow(2).sum()) for v in instruction.payload.values())
                self._start_norms[key] = squares**0.5
            start = self._start_norms[key]
            self._sent[reply.client_id] = (instruction.payload, start, norm)
        return reason

    def references(self, round_norms: list[float], start: float) -> list[tuple[float, str]]:
        """The (value, name) references an update norm is compared with (see the module docstring)."""
        refs = []
        if len(round_norms) >= 3:
            refs.append((round_norms[len(round_norms) // 2], "the round's median"))
        if len(self.history) >= 3:
            median = sorted(self.history)[len(self.history) // 2]
            refs.append((median, "the median of recent accepted updates"))
        if start > 0:
            refs.append((start, "the norm of what the client was sent"))
        if not refs and len(round_norms) == 2:
            refs.append((round_norms[0], "the round's smaller update"))
        return [(value, name) for value, name in refs if value > 0]

    def screen(self, replies: list[ClientReply]) -> tuple[list[ClientReply], list[tuple[int, str]]]:
        replies, rejected = self.inner.screen(replies)
        ratio, clip = self.limits.max_update_norm_ratio, self.limits.clip_update_norm
        norms = sorted(self._sent[r.client_id][2] for r in replies if r.client_id in self._sent)
        kept, accepted = [], []
        for reply in replies:
            if reply.client_id not in self._sent:
                kept.append(reply)
                continue
            sent, start, norm = self._sent[reply.client_id]
            bound = [(v, name) for v, name in self.references(norms, start) if ratio and norm > ratio * v]
            if bound:
                value, name = bound[0]
                rejected.append(
                    (
                        reply.client_id,
                        f"update norm {norm:.3g} is {norm / value:.3g}x {name} "
                        f"(above federation.max_update_norm_ratio {ratio})",
                    )
                )
                continue
            if clip is not None and norm > clip:
                reply.payload = clip_update(sent, reply.payload, clip / norm)
            kept.append(reply)
            accepted.append(min(norm, clip) if clip is not None else norm)
        self.history = (self.history + accepted)[-self.limits.update_norm_history :]
        return kept, rejected

    def server_meta(self) -> dict[str, Any]:
        return {**self.inner.server_meta(), "update_norms": list(self.history)}

    def load_server_meta(self, meta: dict[str, Any]) -> None:
        self.inner.load_server_meta(meta)
        self.history = [float(x) for x in meta.get("update_norms", [])]


def coordinate_median(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise median (mean of the two middle values for an even count), in float64."""
    values = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    n = values.shape[0]
    return values[(n - 1) // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def trimmed_count(fraction: float, n: int) -> int:
    """How many of ``n`` values the trimmed mean drops at each end: floor(fraction n), at least one when
    ``fraction`` > 0 and n >= 3 (with fewer than 1/fraction replies floor would drop none, silently a mean)."""
    cut = int(fraction * n)
    return max(cut, 1) if fraction > 0 and n >= 3 else cut


def trimmed_mean(tensors: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The element-wise mean after dropping :func:`trimmed_count` values at each end, in float64:
    mean(sorted(x)[c : n - c]) with c = max(1, floor(fraction n)) for n >= 3."""
    values = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    cut = trimmed_count(fraction, values.shape[0])
    return values[cut : values.shape[0] - cut].mean(dim=0)


class RobustAggregation(StrategyWrapper):
    """Combines the round's payloads robustly, then lets a linear method aggregate the one combined reply."""

    _own = frozenset({"inner", "rule", "fraction", "trimmed"})

    def __init__(self, inner: Strategy, rule: str, fraction: float = 0.1) -> None:
        if not getattr(inner, "linear_aggregate", False):
            raise ConfigError(
                f"config field 'federation.aggregation': {rule} replaces an average of the payloads, and "
                f"strategy {inner.name} does not aggregate by averaging them; use aggregation: mean"
            )
        super().__init__(inner)
        self.rule = rule
        self.fraction = fraction
        self.trimmed: int | None = None  # values dropped at each end in the last aggregation (trimmed-mean)

    def aggregate(self, server_round: int, replies: list[ClientReply]) -> AdapterState:
        if self.rule == "trimmed-mean":
            self.trimmed = trimmed_count(self.fraction, len(replies))
            if self.trimmed == 0:
                log.warning(
                    "round %d: trimmed-mean of %d replies drops none (it is their mean)",
                    server_round,
                    len(replies),
                )
        first = replies[0].payload
        combined: AdapterState = {}
        for key, tensor in first.items():
            column = [r.payload[key] for r in replies]
            value = (
                coordinate_median(column) if self.rule == "median" else trimmed_mean(column, self.fraction)
            )
            combined[key] = value.to(tensor.dtype)
        total = sum(r.num_examples for r in replies)
        return self.inner.aggregate(server_round, [ClientReply(replies[0].client_id, combined, total)])

    def round_metrics(self) -> dict[str, Any]:
        """The inner method's figures, and with trimmed-mean how many values each end dropped."""
        extra = {"trimmed_per_side": self.trimmed} if self.trimmed is not None else {}
        return {**self.inner.round_metrics(), **extra}
