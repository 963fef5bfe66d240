"""Differential privacy as a strategy wrapper: each client's DP-SGD plan, and the epsilon it has spent.

:class:`DifferentialPrivacy` wraps any strategy whose client hooks can run under DP-SGD (it refuses the others,
naming the reason): it adds each client's noise plan to its instruction (the client's steps become DP-SGD
steps, :mod:`fedlora.client.privacy`) and, for every reply, records the steps taken in the ledger.

Plan (before any training): client i with n_i training examples samples each example with probability
q_i = min(1, batch_size / n_i) per step and takes T_i = its local steps per round x ``federation.rounds``
steps at most. With ``privacy.target_epsilon`` its noise multiplier is the smallest sigma_i for which the
accountant (Opacus' RDP or PRV) gives epsilon <= target at delta after T_i steps at rate q_i, so the budget
holds whichever rounds it ends up sampled in. A plan needing sigma above ``privacy.max_noise_multiplier`` is
refused before any work. Spent: after each round a client took part in, its history gains (sigma_i, q_i,
steps taken) and its epsilon is the accountant's figure for that history. The history is the server state's
``privacy`` fact, checkpointed with it, so a resumed run goes on counting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedlora.config.schema import ClientConfig, PrivacyConfig
from fedlora.data.encoding import steps_for
from fedlora.data.examples import ClientData
from fedlora.errors import ConfigError
from fedlora.strategies.base import ClientInstruction, Review, RoundResults, ServerState, Strategy
from fedlora.strategies.wrappers import StrategyWrapper


@dataclass(frozen=True)
class ClientNoise:
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int


@lru_cache(maxsize=4096)
def _noise_for(epsilon: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps, accountant=accountant
        )
    )


def noise_for_target(priv: PrivacyConfig, rate: float, steps: int) -> float:
    """The smallest noise multiplier for which the accountant keeps ``privacy.target_epsilon`` at
    ``privacy.delta`` after ``steps`` steps at sampling rate ``rate`` (inf where none does)."""
    assert priv.target_epsilon is not None
    try:
        return _noise_for(priv.target_epsilon, priv.delta, rate, steps, priv.accountant)
    except ValueError:
        return float("inf")


@lru_cache(maxsize=4096)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is just looser
        warnings.filterwarnings("ignore", message="Optimal order")
        return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Per-client noise plan and spent-epsilon history."""

    def __init__(self, cfg: PrivacyConfig, plan: dict[int, ClientNoise]) -> None:
        self.cfg = cfg
        self.plan = plan
        self.history: dict[int, list[tuple[float, float, int]]] = {}

    @classmethod
    def plan_for(
        cls, priv: PrivacyConfig, client: ClientConfig, rounds: int, clients: list[ClientData]
    ) -> PrivacyLedger:
        """Each client's noise plan: ``privacy.noise_multiplier``, or the smallest sigma that keeps its
        epsilon at ``privacy.target_epsilon`` over ``rounds`` rounds of its local steps at sampling rate
        q = batch_size / n; refuses a budget no sigma <= ``privacy.max_noise_multiplier`` meets."""
        plan: dict[int, ClientNoise] = {}
        for c in clients:
            n = c.size("train")
            rate = min(1.0, client.batch_size / n)
            per_round = steps_for(n, client.batch_size, client.local_steps, client.local_epochs)
            if priv.noise_multiplier is not None:
                sigma = priv.noise_multiplier
            else:
                total = per_round * rounds
                sigma = noise_for_target(priv, rate, total)
                if sigma > priv.max_noise_multiplier:
                    raise ConfigError(
                        f"config field 'privacy.target_epsilon': epsilon={priv.target_epsilon} at delta={priv.delta} "
                        f"cannot be met for client {c.client_id} ({c.name}: {n} examples, sampling rate {rate:.3g}, "
                        f"up to {total} steps over {rounds} rounds) with a noise multiplier <= "
                        f"privacy.max_noise_multiplier ({priv.max_noise_multiplier}); needs {sigma:.3g}. Raise "
                        f"target_epsilon, take fewer rounds or local steps, or raise max_noise_multiplier."
                    )
            plan[c.client_id] = ClientNoise(sigma, rate, per_round)
        return cls(priv, plan)

    def settings_for(self, client_id: int) -> dict[str, Any]:
        """The ``privacy`` local-training setting (JSON) that makes client ``client_id``'s steps DP-SGD steps."""
        noise = self.plan[client_id]
        return {
            "noise_multiplier": noise.noise_multiplier,
            "max_grad_norm": self.cfg.max_grad_norm,
            "sampling": self.cfg.sampling,
            "sample_rate": noise.sample_rate,
        }

    def record(self, client_id: int, steps: int) -> float:
        """Add a round of ``steps`` DP steps for the client; returns its epsilon spent so far."""
        noise = self.plan[client_id]
        self.history.setdefault(client_id, []).append((noise.noise_multiplier, noise.sample_rate, steps))
        return self.epsilon(client_id)

    def epsilon(self, client_id: int) -> float:
        history = self.history.get(client_id)
        if not history:
            return 0.0
        merged: dict[tuple[float, float], int] = {}  # composition: steps at one (sigma, q) add up
        for sigma, rate, steps in history:
            merged[(sigma, rate)] = merged.get((sigma, rate), 0) + steps
        return _epsilon(tuple((s, q, t) for (s, q), t in merged.items()), self.cfg.delta, self.cfg.accountant)

    def max_epsilon(self) -> float:
        return max((self.epsilon(c) for c in self.history), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {str(c): [list(step) for step in steps] for c, steps in self.history.items()}

    def load_json(self, data: dict[str, Any]) -> None:
        self.history = {
            int(c): [(float(s), float(q), int(t)) for s, q, t in steps] for c, steps in data.items()
        }


def privacy_refusal(strategy: Strategy) -> str | None:
    """Why ``strategy`` cannot run under DP-SGD (one of its client hooks trains outside it), or None."""
    for hook in strategy.client_hooks(ServerState()):
        reason = hook.dp_refusal()
        if reason is not None:
            return reason
    return None


#: the state's fact that holds the ledger's history: {client: [[sigma, q, steps], ...]}
LEDGER_FACT = "privacy"


class DifferentialPrivacy(StrategyWrapper):
    """DP-SGD on every client of any first-order strategy, with a per-client accountant (the plan is
    configuration; what was spent is the state's ``privacy`` fact)."""

    def __init__(self, inner: Strategy, ledger: PrivacyLedger) -> None:
        reason = privacy_refusal(inner)
        if reason is not None:
            raise ConfigError(
                f"config field 'privacy.enabled': strategy {inner.name} cannot run under DP-SGD: {reason}"
            )
        super().__init__(inner)
        self.ledger = ledger

    def spent(self, state: ServerState) -> PrivacyLedger:
        """The ledger with the history recorded in ``state``."""
        ledger = PrivacyLedger(self.ledger.cfg, self.ledger.plan)
        ledger.load_json(state.facts.get(LEDGER_FACT, {}))
        return ledger

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        out = {}
        for cid, instruction in self.inner.configure_round(state, server_round, client_ids).items():
            settings = {**instruction.settings, "privacy": self.ledger.settings_for(cid)}
            out[cid] = ClientInstruction(instruction.payload, settings, instruction.hooks)
        return out

    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        """Every reply that came back spent budget (accepted or not): record its steps first."""
        ledger = self.spent(state)
        for _, reply in results:
            reply.metrics["epsilon"] = ledger.record(reply.client_id, int(reply.metrics.get("steps", 0)))
        return self.inner.review(state.evolve(facts={LEDGER_FACT: ledger.to_json()}), server_round, results)

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        return {**self.inner.round_metrics(state), "epsilon_max": self.spent(state).max_epsilon()}

    def report(self, state: ServerState) -> list[str]:
        ledger = self.spent(state)
        spent = {c: ledger.epsilon(c) for c in ledger.history}
        if not spent:
            return self.inner.report(state)
        worst = max(spent, key=spent.__getitem__)
        line = (
            f"privacy: DP-SGD, delta={self.ledger.cfg.delta}; epsilon spent by the {len(spent)} clients that "
            f"trained: max {spent[worst]:.3f} (client {worst}), mean {sum(spent.values()) / len(spent):.3f} "
            f"(per client and round in metrics.jsonl)"
        )
        return [*self.inner.report(state), line]
