"""Early stopping on a held-out figure, at the server (``eval.early_stopping_patience``).

After each evaluated round the figure (``eval.early_stopping_metric``; losses and perplexities are better
lower, everything else higher) is compared with the best so far; ``patience`` evaluated rounds without an
improvement end the run after that round (its checkpoint and the global adapter are written as usual). The
state is derived from the round records alone, so a resumed run continues exactly where it stood.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


@dataclass
class EarlyStopping:
    """Best figure and round so far, and how many evaluated rounds have passed without improving on it."""

    metric: str
    patience: int
    best: float | None = None
    best_round: int | None = None
    since_best: int = 0

    @classmethod
    def from_records(cls, metric: str, patience: int, records: list[dict[str, Any]]) -> EarlyStopping:
        state = cls(metric, patience)
        for record in records:
            state.update(record)
        return state

    def update(self, record: dict[str, Any]) -> bool:
        """Take a round's record; True when it is the new best (not evaluated: no change)."""
        value = record.get(self.metric)
        if not isinstance(value, (int, float)):
            return False
        better = self.best is None or (
            value < self.best if lower_is_better(self.metric) else value > self.best
        )
        if better:
            self.best, self.best_round, self.since_best = float(value), int(record["round"]), 0
        else:
            self.since_best += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.since_best >= self.patience
