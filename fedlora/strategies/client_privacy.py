"""Client-level differential privacy (``privacy.unit: client``) as a strategy wrapper: DP-FedAvg.

The unit of privacy is a client: the global adapter released after every round is (epsilon, delta)-DP with
respect to adding or removing one client's whole data. Rule (McMahan et al. 2018, "Learning differentially
private recurrent language models"; Flower's ``DifferentialPrivacyServerSideFixedClipping`` /
``...AdaptiveClipping``), for the m replies accepted in round t, client i having been sent ``x_t`` and
replied ``x_i`` (all tensors as one vector):

    Delta_i  = x_i - x_t,          Delta~_i = Delta_i * min(1, C_t / ||Delta_i||_2)
    x_{t+1}  = x_t + (1/m) sum_i Delta~_i + N(0, (sigma C_t / m)^2 I)

Every reply weighs 1/m (an example-weighted average would let one large client move the aggregate by more
than C/m, the sensitivity the noise is calibrated for), so the wrapped method's aggregate sees each reply with
one example (the replies keep their counts for the round's training loss). The noise is drawn on the CPU from a generator seeded by (run seed, round): a resumed run adds
the same noise. It goes on every tensor the round aggregated (``global`` keys the replies carry).

Adaptive clipping (Andrew et al. 2021, "Differentially private learning with adaptive clipping"): with
``b_i = 1[||Delta_i|| <= C_t]`` and ``b~ = (sum_i b_i + N(0, sigma_b^2)) / m``, the next norm is
``C_{t+1} = C_t exp(-eta_C (b~ - gamma))`` (gamma: ``target_clipped_quantile``, eta_C: ``clip_norm_lr``,
sigma_b: ``clipped_count_stddev``, default m / 20). The count is a second Gaussian query (of sensitivity 1/2
with the bits centred, so noise multiplier 2 sigma_b), and the update's noise multiplier becomes
``sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2)``, which keeps the round's total privacy cost at sigma (their
Theorem 1; Flower's ``compute_adaptive_noise_params``); a sigma_b with 2 sigma_b <= sigma is refused.

Accounting: each round is one subsampled Gaussian mechanism with noise multiplier sigma and sampling rate
q = (clients per round) / (clients), composed over the rounds by Opacus's RDP (or PRV) accountant; with
``target_epsilon`` sigma is the smallest that keeps epsilon after ``federation.rounds`` rounds within it. The
accountant assumes Poisson sampling of clients; fedlora samples a fixed number each round (as Flower and TFF
do), for which the figure is the usual approximation. The history (rounds run, the clipping norm) is the state's
``client_privacy`` fact, checkpointed with it. The server is trusted (central DP: it sees the updates before
clipping, as with Flower's server-side wrappers); what the guarantee covers is the sequence of global adapters,
not the per-client lines of metrics.jsonl.

For methods whose aggregate is a weighted average of the payloads (``linear_aggregate``: FedIT, FedAvg, FedProx,
FFA-LoRA, FedSA-LoRA, pFedLoRA); the others are refused with the reason: a nonlinear aggregate (FlexLoRA's SVD,
HetLoRA's rank-weighted sum, FedProto's prototypes, a seed replay) has no sensitivity bound from clipping the
payloads alone.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.adapters.state import AdapterState, clip_update, same_shapes, update_norm
from fedlora.client.clipping import ClipUpdate
from fedlora.config.schema import PrivacyConfig
from fedlora.errors import ConfigError
from fedlora.strategies.base import (
    GLOBAL,
    ClientInstruction,
    ClientReply,
    Review,
    RoundResults,
    ServerState,
    Strategy,
    client_privacy_refusal,
)
from fedlora.strategies.privacy import _epsilon, noise_for_target
from fedlora.strategies.wrappers import StrategyWrapper

#: the state's fact: {"rounds": rounds noised so far, "clipping_norm": C for the next round}
CLIENT_LEDGER_FACT = "client_privacy"


@dataclass(frozen=True)
class ClientNoisePlan:
    """The run's client-level mechanism: noise multiplier sigma, client sampling rate q, the rounds it plans."""

    noise_multiplier: float
    sample_rate: float
    rounds: int

    @classmethod
    def plan_for(cls, priv: PrivacyConfig, per_round: int, num_clients: int, rounds: int) -> ClientNoisePlan:
        """sigma from ``privacy.noise_multiplier``, or the smallest that keeps epsilon within
        ``privacy.target_epsilon`` after ``rounds`` rounds at q = per_round / num_clients (refused, naming why,
        above ``privacy.max_noise_multiplier``)."""
        rate = min(1.0, per_round / num_clients)
        if priv.noise_multiplier is not None:
            return cls(priv.noise_multiplier, rate, rounds)
        sigma = noise_for_target(priv, rate, rounds)
        if sigma > priv.max_noise_multiplier:
            raise ConfigError(
                f"config field 'privacy.target_epsilon': client-level epsilon={priv.target_epsilon} at "
                f"delta={priv.delta} over {rounds} rounds with {per_round} of {num_clients} clients a round "
                f"(q={rate:.3g}) needs a noise multiplier of {sigma:.3g}, above privacy.max_noise_multiplier "
                f"({priv.max_noise_multiplier}); raise target_epsilon, run fewer rounds or sample fewer clients"
            )
        return cls(sigma, rate, rounds)

    def epsilon(self, rounds: int, delta: float, accountant: str) -> float:
        """The accountant's epsilon after ``rounds`` rounds of this mechanism."""
        if rounds <= 0:
            return 0.0
        return _epsilon(((self.noise_multiplier, self.sample_rate, rounds),), delta, accountant)


def update_noise_multiplier(sigma: float, count_stddev: float) -> float:
    """sigma_Delta = (sigma^-2 - (2 sigma_b)^-2)^(-1/2): the update's noise multiplier when the clipped count
    (centred bits, sensitivity 1/2, noise sigma_b) also spends budget (Andrew et al. 2021, Theorem 1)."""
    if 2 * count_stddev <= sigma:
        raise ConfigError(
            f"config field 'privacy.clipped_count_stddev': {count_stddev:g} leaves no budget for the update at "
            f"noise multiplier {sigma:.3g} (adaptive clipping needs 2 x clipped_count_stddev > sigma, i.e. above "
            f"{sigma / 2:.3g}; its default is clients per round / 20); raise it or use fixed clipping"
        )
    return float((sigma**-2 - (2 * count_stddev) ** -2) ** -0.5)


class ClientLevelPrivacy(StrategyWrapper):
    """DP-FedAvg around a linear method: clip each update, average them uniformly, add Gaussian noise."""

    def __init__(
        self, inner: Strategy, cfg: PrivacyConfig, plan: ClientNoisePlan, clip_on_clients: bool = False
    ) -> None:
        """``clip_on_clients``: the clients clip their own updates (:class:`~fedlora.client.clipping.ClipUpdate`,
        fixed C) and send them with equal weights, because secure aggregation hides each one from the server;
        the server adds the noise to the average it is given."""
        reason = client_privacy_refusal(inner.name, inner.linear_aggregate)
        if reason is not None:
            raise ConfigError(reason)
        super().__init__(inner)
        self.cfg = cfg
        self.plan = plan
        self.clip_on_clients = clip_on_clients

    def configure_round(
        self, state: ServerState, server_round: int, client_ids: list[int]
    ) -> dict[int, ClientInstruction]:
        """The inner instructions; with ``clip_on_clients`` each also clips its update to C_t on the client."""
        instructions = self.inner.configure_round(state, server_round, client_ids)
        if not self.clip_on_clients:
            return instructions
        clip = ClipUpdate(norm=float(self.ledger(state)["clipping_norm"]))
        return {c: dataclasses.replace(i, hooks=[*i.hooks, clip]) for c, i in instructions.items()}

    def ledger(self, state: ServerState) -> dict[str, Any]:
        """Rounds noised so far and the clipping norm of the next round (from the state's facts)."""
        return dict(
            state.facts.get(CLIENT_LEDGER_FACT, {"rounds": 0, "clipping_norm": self.cfg.clipping_norm})
        )

    def review(self, state: ServerState, server_round: int, results: RoundResults) -> Review:
        """The inner review, then every accepted update clipped to C_t; with adaptive clipping, the noisy
        clipped fraction moves C for the next round."""
        inner = self.inner.review(state, server_round, results)
        if self.clip_on_clients:  # the replies are the average of updates the clients clipped themselves
            return inner
        ledger = self.ledger(inner.state)
        norm_c = float(ledger["clipping_norm"])
        sent = {reply.client_id: instruction.payload for instruction, reply in results}
        accepted, rejected, within = [], list(inner.rejected), 0
        for reply in inner.accepted:
            payload = sent[reply.client_id]
            if not same_shapes(payload, reply.payload):
                rejected.append(
                    (reply.client_id, "not an update of what it was sent: client-level DP clips updates")
                )
                continue
            norm = update_norm(payload, reply.payload)
            within += norm <= norm_c
            clipped = clip_update(payload, reply.payload, min(1.0, norm_c / norm) if norm > 0 else 1.0)
            reply.metrics.update(update_norm=norm, clipped=float(norm > norm_c))  # the client's line
            accepted.append(ClientReply(reply.client_id, clipped, reply.num_examples, reply.metrics))
        if self.cfg.adaptive_clipping and accepted:
            stddev = self.count_stddev(len(accepted))
            noise = torch.randn(1, generator=self.generator(server_round, "count"), dtype=torch.float64)
            fraction = (within + stddev * float(noise)) / len(accepted)
            eta, gamma = self.cfg.clip_norm_lr, self.cfg.target_clipped_quantile
            ledger["next_clipping_norm"] = norm_c * math.exp(-eta * (fraction - gamma))
        return Review(inner.state.evolve(facts={CLIENT_LEDGER_FACT: ledger}), accepted, rejected)

    def count_stddev(self, replies: int) -> float:
        """sigma_b: ``privacy.clipped_count_stddev``, or m / 20 (Andrew et al.; Flower's default)."""
        given = self.cfg.clipped_count_stddev
        return given if given is not None else replies / 20

    def generator(self, server_round: int, what: str) -> torch.Generator:
        """A CPU generator for round ``server_round``'s noise (``what``: the update's or the count's)."""
        offset = {"update": 0, "count": 1}[what]
        return torch.Generator().manual_seed((self.setup.seed * 1_000_003 + server_round) * 2 + offset)

    def aggregate(self, state: ServerState, server_round: int, replies: list[ClientReply]) -> ServerState:
        """The inner method's (uniform) average of the clipped replies, plus N(0, (sigma C / m)^2) on every
        tensor the replies carry."""
        ledger = self.ledger(state)
        norm_c = float(ledger["clipping_norm"])  # C_t (the review clipped with it)
        sigma = self.plan.noise_multiplier
        if self.cfg.adaptive_clipping:
            sigma = update_noise_multiplier(sigma, self.count_stddev(len(replies)))
        uniform = [ClientReply(r.client_id, r.payload, 1, r.metrics) for r in replies]  # each weighs 1 / m
        out = self.inner.aggregate(state, server_round, uniform)
        std = sigma * norm_c / len(replies)
        generator = self.generator(server_round, "update")
        noised: AdapterState = {}
        for key, value in out.adapter.items():
            if key in replies[0].payload:
                noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
                noised[key] = (value.double() + std * noise).to(value.dtype)
            else:
                noised[key] = value
        ledger["rounds"] = int(ledger["rounds"]) + 1
        ledger["clipping_norm"] = float(ledger.pop("next_clipping_norm", norm_c))
        ledger["noise_std"] = std
        return out.evolve({GLOBAL: noised}, facts={CLIENT_LEDGER_FACT: ledger})

    def round_metrics(self, state: ServerState) -> dict[str, float]:
        ledger = self.ledger(state)
        figures = {
            **self.inner.round_metrics(state),
            "epsilon_client": self.plan.epsilon(int(ledger["rounds"]), self.cfg.delta, self.cfg.accountant),
            "clipping_norm": float(ledger["clipping_norm"]),
        }
        if "noise_std" in ledger:
            figures["noise_std"] = float(ledger["noise_std"])
        return figures

    def report(self, state: ServerState) -> list[str]:
        ledger = self.ledger(state)
        rounds = int(ledger["rounds"])
        epsilon = self.plan.epsilon(rounds, self.cfg.delta, self.cfg.accountant)
        line = (
            f"privacy: client-level DP (DP-FedAvg), delta={self.cfg.delta}; epsilon {epsilon:.3f} after {rounds} "
            f"noised rounds (noise multiplier {self.plan.noise_multiplier:.3g}, {self.plan.sample_rate:.3g} of "
            f"the clients a round, clipping norm {float(ledger['clipping_norm']):.3g})"
        )
        return [*self.inner.report(state), line]
