"""FFA-LoRA (frozen A, B-only payloads, exact aggregation) and DP-SGD with an accountant."""

from pathlib import Path

import pytest
import torch

from conftest import assert_rel_close, tiny_engine, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.adapters.state import state_digest
from fedlora.client.settings import DPSettings, LocalTrainingSettings
from fedlora.client.trainer import train_locally
from fedlora.config.loader import ConfigError
from fedlora.engine.embedded import EmbeddedEngine
from fedlora.engine.server import Server
from fedlora.runner import build_simulation
from fedlora.strategies.base import ClientReply, ServerSetup
from fedlora.strategies.ffa_lora import FFALoRA, FrozenA

SQUARE = {"adapter.target_modules": "[q_proj, o_proj]", "adapter.dropout": 0.0}


def test_ffa_aggregation_is_exact_for_the_product() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 12, generator=gen)
    init = {"m.q_proj.lora_A.weight": A, "m.q_proj.lora_B.weight": torch.zeros(10, 4)}
    strategy = FFALoRA()
    server = Server(
        strategy, ServerSetup(init, {i: RankProfile.uniform(4) for i in range(3)}, lora_alpha=8.0)
    )
    payload = server.configure(1, [0])[0]
    assert list(payload.payload) == ["m.q_proj.lora_B.weight"]
    assert payload.hooks == [FrozenA(a_digest=state_digest({"m.q_proj.lora_A.weight": A}))]
    Bs = [torch.randn(10, 4, generator=gen, dtype=torch.float32) for _ in range(3)]
    sizes = [2, 5, 9]
    server.aggregate(
        1, [ClientReply(i, {"m.q_proj.lora_B.weight": B}, n) for i, (B, n) in enumerate(zip(Bs, sizes))]
    )
    full = server.evaluation_state()
    assert torch.equal(full["m.q_proj.lora_A.weight"], A)
    mean_of_products = sum(n / 16 * (B.double() @ A.double()) for B, n in zip(Bs, sizes))
    product_of_means = full["m.q_proj.lora_B.weight"].double() @ A.double()
    assert_rel_close(product_of_means, mean_of_products, 1e-6)


def test_a_stays_bit_identical_and_only_b_travels(tmp_path: Path) -> None:
    cfg = load_config(
        None, tiny_overrides(tmp_path, **SQUARE, **{"strategy.name": "ffa-lora", "federation.rounds": 3})
    )
    sim, _ = build_simulation(cfg)
    initial_a = {k: v.clone() for k, v in sim.adapters.initial_state().items() if ".lora_A." in k}
    engine = EmbeddedEngine(sim, tmp_path)
    seen_a = []
    original = engine.run_client

    def spy(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        assert not any(".lora_A." in k for k in instruction.payload) and not any(
            ".lora_A." in k for k in reply.payload
        )
        seen_a.append({k: v.clone() for k, v in sim.adapters.state().items() if ".lora_A." in k})
        return reply

    engine.run_client = spy
    records = [engine.run_round(r) for r in (1, 2, 3)]
    assert len(seen_a) == 6
    for a in seen_a:  # every client, every round: the seeded A, bit for bit
        assert all(torch.equal(a[k], initial_a[k]) for k in initial_a)
    assert not all(torch.count_nonzero(v) == 0 for k, v in sim.server.global_state.items())  # B trained
    # bytes: half of FedIT's at the same rank on square modules
    # Under Flower each client builds its own model: two independently built clients hold the same A, bit
    # for bit, and the digest the server sends matches what each computes from its own A.
    other, _ = build_simulation(cfg)
    other_a = {k: v for k, v in other.adapters.initial_state().items() if ".lora_A." in k}
    assert all(torch.equal(other_a[k], initial_a[k]) for k in initial_a)
    digest = engine.sim.server.configure(4, [0])[0].hooks[0].a_digest
    assert state_digest(other_a) == digest == state_digest(initial_a)
    cfg_fedit = load_config(None, tiny_overrides(tmp_path, **SQUARE, **{"federation.rounds": 1}))
    sim_fedit, _ = build_simulation(cfg_fedit)
    fedit_up = EmbeddedEngine(sim_fedit, tmp_path / "fedit").run_round(1)["clients"][0]["bytes_up"]
    ffa_up = records[0]["clients"][0]["bytes_up"]
    assert abs(ffa_up / fedit_up - 0.5) < 0.02


def test_dp_sgd_step_matches_per_example_clipping_by_hand(tmp_path: Path) -> None:
    """sigma = 0: the DP step is exactly SGD on (sum_i clip_C(g_i)) / batch_size."""
    cfg = load_config(None, tiny_overrides(tmp_path, **SQUARE))
    sim, _ = build_simulation(cfg)
    client = sim.federation.clients[0]
    n = len(client.train)
    start = {
        k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) * 0.1
        for k, v in sim.server.global_state.items()
    }
    C, lr = 0.05, 0.1
    settings = LocalTrainingSettings(
        optimizer="sgd",
        lr=lr,
        local_steps=1,
        batch_size=n,
        grad_clip=None,
        privacy=DPSettings(noise_multiplier=0.0, max_grad_norm=C, sampling="shuffle"),
    )
    result = train_locally(sim.adapters, sim.encoder, client, start, settings, seed=7)
    # by hand: each example's gradient on its own, clipped as one vector, summed, / batch size
    from fedlora.client.loss import batch_loss
    from fedlora.data.encoding import collate

    sim.adapters.load(start)
    model = sim.adapters.model
    named = sim.adapters.trainable_parameters()
    total = {k: torch.zeros_like(p) for k, p in named}
    model.train()
    for item in sim.encoder.encode_all(client.train):
        model.zero_grad(set_to_none=True)
        batch_loss(model, collate([item], sim.encoder.tokenizer.pad_token_id), "causal-lm").backward()
        grads = {k: p.grad.clone() for k, p in named}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        for k in total:
            total[k] += grads[k] * min(1.0, C / (float(norm) + 1e-6))
    model.eval()
    for k, p0 in start.items():
        expected = p0 - lr * total[k] / n
        assert_rel_close(result.state[k], expected, 1e-5)
    assert any(not torch.equal(result.state[k], start[k]) for k in start)


def test_target_epsilon_is_met_and_tracked(tmp_path: Path) -> None:
    engine = tiny_engine(
        tmp_path,
        **SQUARE,
        **{
            "strategy.name": "ffa-lora",
            "privacy.enabled": "true",
            "privacy.target_epsilon": 2.0,
            "federation.clients_per_round": 4,
            "federation.rounds": 3,
        },
    )
    sim = engine.sim
    eps = [engine.run_round(r)["epsilon_max"] for r in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2] <= 2.0 + 0.05  # every client took every round: the budget is spent
    assert eps[2] > 1.8
    assert all(sim.strategy.ledger.plan[c].noise_multiplier > 0.3 for c in sim.strategy.ledger.plan)


def test_impossible_budget_and_unsupported_layer_fail_before_training(tmp_path: Path) -> None:
    impossible = tiny_overrides(
        tmp_path,
        **{"privacy.enabled": "true", "privacy.target_epsilon": 0.01, "privacy.max_noise_multiplier": 5},
    )
    with pytest.raises(ConfigError, match=r"privacy.target_epsilon.*cannot be met for client 0"):
        build_simulation(load_config(None, impossible))
    embedding = tiny_overrides(
        tmp_path,
        **{
            "privacy.enabled": "true",
            "privacy.noise_multiplier": 1.0,
            "adapter.target_modules": "[embed_tokens, q_proj]",
        },
    )
    with pytest.raises(ValueError, match=r"no per-example gradient rule for .*embed_tokens"):
        build_simulation(load_config(None, embedding))
    with pytest.raises(ConfigError, match="exactly one of target_epsilon and noise_multiplier"):
        load_config(None, ["privacy.enabled=true"])
    with pytest.raises(ConfigError, match="proximal"):
        load_config(None, ["privacy.enabled=true", "privacy.noise_multiplier=1", "strategy.name=fedprox"])


def test_dp_works_with_flexlora_at_heterogeneous_ranks(tmp_path: Path) -> None:
    engine = tiny_engine(
        tmp_path,
        **{
            "strategy.name": "flexlora",
            "resources.distribution": "uniform",
            "resources.rank_scale": 0.1,
            "federation.clients_per_round": 4,
            "privacy.enabled": "true",
            "privacy.target_epsilon": 5.0,
        },
    )
    record = engine.run_round(1)
    assert record["num_clients"] == 4 and record["rejected"] == []
    # attention-only targets: a3-m20 is r3 here, so three distinct ranks
    assert len({c["rank"] for c in record["clients"]}) == 3 and 0 < record["epsilon_max"] <= 5.0
    # each client's plan and spent epsilon, recomputed independently with Opacus' own accountant API: sigma_i
    # meets the target over all rounds of its steps (and is not larger than needed), the round's epsilon is
    # the accountant's for the steps it took
    from opacus.accountants import RDPAccountant

    rounds = engine.sim.plan.federation.rounds
    ledger = engine.sim.strategy.spent(engine.sim.server.state)  # the plan, and the history the state holds
    delta = ledger.cfg.delta
    for client in record["clients"]:
        noise = ledger.plan[client["client"]]
        total = noise.steps_per_round * rounds

        def spent(sigma: float, steps: int, rate: float = noise.sample_rate) -> float:
            accountant = RDPAccountant()
            for _ in range(steps):
                accountant.step(noise_multiplier=sigma, sample_rate=rate)
            return accountant.get_epsilon(delta=delta)

        assert noise.noise_multiplier > 0 and spent(noise.noise_multiplier, total) <= 5.0 + 1e-6
        assert spent(noise.noise_multiplier * 0.95, total) > 5.0  # 5% less noise would overspend
        assert ledger.epsilon(client["client"]) == pytest.approx(
            spent(noise.noise_multiplier, noise.steps_per_round), rel=1e-6
        )


def test_a_client_with_another_frozen_a_refuses_to_train(tmp_path: Path) -> None:
    """A client built with another init seed (so another A) would break FFA-LoRA's exact average silently."""
    cfg = load_config(None, tiny_overrides(tmp_path, **SQUARE, **{"strategy.name": "ffa-lora"}))
    sim, _ = build_simulation(cfg)
    instruction = sim.server.configure(1, [0])[0]
    other_seed = load_config(
        None, tiny_overrides(tmp_path, **SQUARE, **{"strategy.name": "ffa-lora", "adapter.init_seed": 5})
    )
    client_sim, _ = build_simulation(other_seed)
    with pytest.raises(ValueError, match="frozen LoRA A differs"):
        EmbeddedEngine(client_sim, tmp_path).run_client(1, 0, instruction)
    same, _ = build_simulation(cfg)  # the same config: trains
    assert EmbeddedEngine(same, tmp_path).run_client(1, 0, instruction).num_examples > 0
