"""Client-level DP (privacy.unit: client, DP-FedAvg): the clipped uniform average against a dense float64
computation, the noise's standard deviation, adaptive clipping's rule, epsilon against Opacus's accountant, and
the refusals."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import relative_error, tiny_overrides
from fedlora.adapters.ranks import RankProfile
from fedlora.config.schema import PrivacyConfig
from fedlora.errors import ConfigError
from fedlora.preflight import load_config
from fedlora.runner import run
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.client_privacy import ClientLevelPrivacy, ClientNoisePlan
from fedlora.strategies.fedavg import FedIT
from fedlora.testing.conformance import relative_error as state_error

CLIENTS = 5


def adapter(gen: torch.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        f"m.{layer}.lora_{factor}.weight": scale * torch.randn(shape, generator=gen)
        for layer in ("q_proj", "v_proj")
        for factor, shape in (("A", (8, 256)), ("B", (256, 8)))
    }


def dp_round(noise_multiplier: float, seed: int = 3, **privacy: object):
    """One round of DP-FedAvg around FedIT on random updates of norms 0.5 .. 4 (C = 1.5); returns the
    wrapper, the state the clients were sent, their updates and the state after aggregation."""
    gen = torch.Generator().manual_seed(0)
    start = adapter(gen)
    setup = ServerSetup(start, {i: RankProfile.uniform(8) for i in range(CLIENTS)}, 16.0, seed=seed)
    cfg = PrivacyConfig(
        enabled=True, unit="client", noise_multiplier=noise_multiplier, clipping_norm=1.5, **privacy
    )
    wrapper = ClientLevelPrivacy(FedIT(), cfg, ClientNoisePlan(noise_multiplier, CLIENTS / 20, 10))
    state = wrapper.initialize(setup)
    instructions = wrapper.configure_round(state, 1, list(range(CLIENTS)))
    updates = []
    for target in (0.5, 1.0, 2.0, 3.0, 4.0):
        update = adapter(gen)
        norm = math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))
        updates.append({k: v * (target / norm) for k, v in update.items()})
    results = [
        (instructions[i], ClientReply(i, {k: start[k] + u[k] for k in start}, num_examples=10 * (i + 1)))
        for i, u in enumerate(updates)
    ]
    review = wrapper.review(state, 1, results)
    after = wrapper.aggregate(review.state, 1, review.accepted)
    return wrapper, start, updates, review, after


def test_the_clipped_uniform_average_against_a_dense_computation():
    """x_{t+1} = x_t + (1/m) sum_i Delta_i min(1, C / ||Delta_i||) (+ noise, here 1e-9 C / m): every reply
    weighs 1/m whatever its example count."""
    _, start, updates, review, after = dp_round(1e-9)
    norms = [math.sqrt(sum(float(v.double().pow(2).sum()) for v in u.values())) for u in updates]
    for key in start:
        clipped = [u[key].double() * min(1.0, 1.5 / n) for u, n in zip(updates, norms, strict=True)]
        dense = start[key].double() + torch.stack(clipped).mean(0)
        assert relative_error(after.adapter[key], dense) < 1e-6
    lines = [r.metrics for r in review.accepted]
    assert [c["clipped"] for c in lines] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [round(c["update_norm"], 4) for c in lines] == [0.5, 1.0, 2.0, 3.0, 4.0]


def test_the_noise_has_std_sigma_c_over_m_and_is_seeded():
    sigma, c, m = 0.8, 1.5, CLIENTS
    wrapper, start, _, _, after = dp_round(sigma)
    _, _, _, _, quiet = dp_round(1e-9)
    noise = torch.cat([(after.adapter[k].double() - quiet.adapter[k].double()).reshape(-1) for k in start])
    assert noise.numel() == 8192
    expected = sigma * c / m
    assert abs(float(noise.std()) / expected - 1) < 0.05  # 8,192 draws: the estimate's sd is 0.8%
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(noise.numel())
    _, _, _, _, again = dp_round(sigma)
    assert all(torch.equal(after.adapter[k], again.adapter[k]) for k in start)  # seeded by (seed, round)
    _, _, _, _, other = dp_round(sigma, seed=4)
    differ = torch.cat([(after.adapter[k].double() - other.adapter[k].double()).reshape(-1) for k in start])
    assert abs(float(differ.std()) / (math.sqrt(2) * expected) - 1) < 0.05  # two runs: sqrt(2) sigma C / m
    assert wrapper.round_metrics(after)["noise_std"] == pytest.approx(expected)


def test_adaptive_clipping_moves_c_towards_the_target_quantile():
    """C_{t+1} = C_t exp(-eta (b~ - gamma)), b~ the (noisy) share of updates within C_t: 2 of 5 within 1.5."""
    wrapper, *_, after = dp_round(1e-9, adaptive_clipping=True, clipped_count_stddev=1e-6)
    expected = 1.5 * math.exp(-0.2 * (2 / 5 - 0.5))
    assert wrapper.round_metrics(after)["clipping_norm"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigError, match="clipped_count_stddev.*leaves no budget"):
        dp_round(1.0, adaptive_clipping=True)  # default sigma_b = m / 20 = 0.25: 2 sigma_b < sigma


def test_epsilon_per_round_is_the_accountants(tmp_path):
    """Each round is one subsampled Gaussian at q = clients per round / clients: epsilon after r rounds is
    Opacus's RDP accountant's for r steps of (sigma, q); with target_epsilon, sigma keeps it within the target."""
    from opacus.accountants import RDPAccountant

    base = [*tiny_overrides(tmp_path), "federation.rounds=3", "privacy.enabled=true", "privacy.unit=client"]
    result = run(
        load_config(None, [*base, "privacy.noise_multiplier=1.3"]), tmp_path / "a", show_progress=False
    )
    q = 2 / 4  # the tiny federation: 2 of its 4 clients a round
    for record in result.records:
        accountant = RDPAccountant()
        accountant.history = [(1.3, q, record["round"])]
        assert record["epsilon_client"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
        assert record["clipping_norm"] == 1.0 and record["noise_std"] == pytest.approx(1.3 * 1.0 / 2)
        assert all("update_norm" in c for c in record["clients"])
    targeted = run(
        load_config(None, [*base, "privacy.target_epsilon=4"]), tmp_path / "b", show_progress=False
    )
    assert 3.6 < targeted.records[-1]["epsilon_client"] <= 4.0
    # the noise is there: the adapter differs from a run without privacy by far more than rounding
    plain = run(
        load_config(None, tiny_overrides(tmp_path) + ["federation.rounds=3"]),
        tmp_path / "c",
        show_progress=False,
    )
    assert state_error(result.final_state, plain.final_state) > 1


def test_refusals_name_the_field():
    client_dp = ["privacy.enabled=true", "privacy.unit=client", "privacy.noise_multiplier=1"]
    with pytest.raises(ConfigError, match="privacy.unit.*flexlora does not aggregate by a weighted average"):
        load_config(None, [*client_dp, "strategy.name=flexlora"])
    with pytest.raises(ConfigError, match="federation.aggregation median replaces that average"):
        load_config(None, [*client_dp, "federation.aggregation=median"])
    # DP-SGD's own limits do not apply to client-level DP (no per-example clipping on the clients)
    load_config(None, [*client_dp, "client.gradient_accumulation_steps=2", "strategy.name=fedprox"])
