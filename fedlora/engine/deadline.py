"""How long a client may take before its round goes on without it: one rule for every transport that waits on
clients it cannot see (worker processes, Flower nodes), so a stopped or hung client never hangs a run.

The limit is ``federation.client_timeout`` seconds, or with ``auto`` (the default)

    limit = max(client_timeout_floor, 10 x median(the last 50 clients' times)),

and ``client_timeout_floor`` (600 s) until a first client has replied. A client past its limit is dropped for
the round with a reason that starts with ``timeout`` (metrics.jsonl's ``rejected``), and the round goes on
under ``federation.min_replies`` / ``on_too_few`` like any other missing reply."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from fedlora.config.schema import FederationConfig

#: auto: the limit is this many times the median client time
AUTO_FACTOR = 10.0
#: auto: the median is over this many of the latest client times
AUTO_WINDOW = 50


@dataclass
class ClientDeadline:
    """The current limit on one client's time in a round (seconds), learned from the clients' times."""

    fixed: float | None = None
    floor: float = 600.0
    durations: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, federation: FederationConfig) -> ClientDeadline:
        fixed = federation.client_timeout
        return cls(None if fixed == "auto" else float(fixed), federation.client_timeout_floor)

    def seconds(self) -> float:
        """The limit now: the fixed one, else max(floor, 10 x the median of the recent client times)."""
        if self.fixed is not None:
            return self.fixed
        if not self.durations:
            return self.floor
        return max(self.floor, AUTO_FACTOR * statistics.median(self.durations[-AUTO_WINDOW:]))

    def record(self, seconds: float) -> None:
        """A client replied after ``seconds``."""
        self.durations.append(seconds)
        del self.durations[:-AUTO_WINDOW]

    @staticmethod
    def reason(limit: float) -> str:
        """Why a client past ``limit`` was left out (the round's record keeps it)."""
        return f"timeout: no reply within {limit:.4g} s (federation.client_timeout)"
