"""Robustness as strategy wrappers (any strategy, any engine): update-norm screening and clipping, and
robust aggregation rules for methods that average.

Screening. For a reply that is an update of what the client was sent (same tensor names and shapes), its
norm is u = ||reply - sent|| over all tensors as one vector. It is rejected when u > ``max_update_norm``, or
when u > ``max_update_norm_ratio`` x r for any reference r available:

- the median of the last ``update_norm_history`` accepted update norms (3 or more; the state's
  ``update_norms`` fact, kept across rounds and in the checkpoints), so one round of mostly corrupted replies cannot move the bar;
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

from fedlora.adapters.state import AdapterState, clip_update, same_shapes, update_norm
from fedlora.config.schema import FederationConfig
from fedlora.errors import ConfigError
from fedlora.strategies.base import ClientReply, Review, RoundResults, ServerState, Strategy
from fedlora.strategies.wrappers import StrategyWrapper

log = logging.getLogger(__name__)


#: the state's fact that holds the accepted update norms, newest last
NORMS_FACT = "update_norms"


class UpdateNormScreen(StrategyWrapper):
    """Rejects updates by absolute norm and by ratio to the history, the start point and the round;
    clips the accepted ones."""

    def __init__(self, inner: Strategy, limits: FederationConfig) -> None:
        super().__init__(inner)
        self.limits = limits

    def references(
        self, history: list[float], round_norms: list[float], start: float
    ) -> list[tuple[float, str]]:
        """The (value, name) references an update norm is compared with (see the module docstring)."""
        refs = []
        if len(round_norms) >= 3:
            refs.append((round_norms[len(round_norms) // 2], "the round's median"))
        if len(history) >= 3:
            median = sorted(history)[len(history) // 2]
            refs.append((median, "the median of recent accepted updates"))
        if start > 0:
            refs.append((start, "the norm of what the client was sent"))
        if not refs and len(round_norms) == 2:
            refs.append((round_norms[0], "the round's smaller update"))
        return [(value, name) for value, name in refs if value > 0]

    def update_norms(
        self, results: RoundResults, accepted: list[ClientReply], rejected: list[tuple[int, str]]
    ) -> tuple[list[ClientReply], dict[int, tuple[AdapterState, float, float]]]:
        """The accepted replies within ``federation.max_update_norm`` (the others join ``rejected``), and for
        each reply that is an update of what it was sent: (sent, ||sent||, ||update||)."""
        sent = {reply.client_id: (instruction.payload, reply.payload) for instruction, reply in results}
        start_norms: dict[int, float] = {}  # id(payload) -> its norm (clients often share one)
        kept, norms = [], {}
        for reply in accepted:
            payload, as_received = sent[reply.client_id]
            if not same_shapes(payload, as_received):  # a seeds record, a pruned reply: not an update
                kept.append(reply)
                continue
            norm = update_norm(payload, reply.payload)
            limit = self.limits.max_update_norm
            if limit is not None and norm > limit:
                rejected.append(
                    (reply.client_id, f"update norm {norm:.3g} above federation.max_update_norm ({limit})")
                )
                continue
            key = id(payload)
            if key not in start_norms:
                start_norms[key] = sum(float(v.double().pow(2).sum()) for v in payload.values()) ** 0.5
            norms[reply.client_id] = (payload, start_norms[key], norm)
            kept.append(reply)
        return kept, norms

    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        inner = self.inner.review(state, server_round, results)
        rejected = list(inner.rejected)
        replies, updates = self.update_norms(results, inner.accepted, rejected)
        history = [float(x) for x in inner.state.facts.get(NORMS_FACT, [])]
        ratio, clip = self.limits.max_update_norm_ratio, self.limits.clip_update_norm
        norms = sorted(norm for _, _, norm in updates.values())
        kept, accepted = [], []
        for reply in replies:
            if reply.client_id not in updates:
                kept.append(reply)
                continue
            sent, start, norm = updates[reply.client_id]
            refs = self.references(history, norms, start)
            bound = [(v, name) for v, name in refs if ratio and norm > ratio * v]
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
        history = (history + accepted)[-self.limits.update_norm_history :]
        return Review(inner.state.evolve(facts={NORMS_FACT: history}), kept, rejected)


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


#: the state's fact: values dropped at each end by the last trimmed-mean aggregation
TRIMMED_FACT = "trimmed_per_side"


class RobustAggregation(StrategyWrapper):
    """Combines the round's payloads robustly, then lets a linear method aggregate the one combined reply."""

    def __init__(self, inner: Strategy, rule: str, fraction: float = 0.1) -> None:
        if not inner.linear_aggregate:
            raise ConfigError(
                f"config field 'federation.aggregation': {rule} replaces an average of the payloads, and "
                f"strategy {inner.name} does not aggregate by averaging them; use aggregation: mean"
            )
        super().__init__(inner)
        self.rule = rule
        self.fraction = fraction

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        facts = {}
        if self.rule == "trimmed-mean":
            facts[TRIMMED_FACT] = trimmed_count(self.fraction, len(replies))
            if facts[TRIMMED_FACT] == 0:
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
        combined_reply = ClientReply(replies[0].client_id, combined, total)
        return self.inner.aggregate(state, server_round, [combined_reply]).evolve(facts=facts)

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        """The inner method's figures, and with trimmed-mean how many values each end dropped."""
        extra = {TRIMMED_FACT: state.facts[TRIMMED_FACT]} if TRIMMED_FACT in state.facts else {}
        return {**self.inner.round_metrics(state), **extra}
