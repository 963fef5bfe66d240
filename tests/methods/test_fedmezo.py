"""FedMeZO: the MeZO step by hand, bit-exact replay of seed uploads, personalised learning rates."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import RankProfile
from fedlora.client.settings import LocalTrainingSettings, round_settings
from fedlora.client.trainer import train_locally
from fedlora.client.zeroth_order import GRADS_KEY, ZerothOrder, perturb, replay, zo_step
from fedlora.engine.embedded import EmbeddedEngine
from fedlora.engine.server import Server
from fedlora.runner import build_simulation
from fedlora.strategies.base import ClientInstruction, ClientReply, ServerSetup
from fedlora.strategies.fedmezo import FedMeZO, FedMeZOOptions


def test_mezo_step_matches_the_rule_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 3, generator=gen)
    bias = torch.randn(3, generator=gen)
    target = torch.randn(5, 3, generator=gen)
    named = [("layer.weight", w), ("layer.bias", bias)]
    w0, b0 = w.clone(), bias.clone()

    def loss() -> float:
        return float(((w - target) ** 2).sum() + (bias**2).sum())

    eps, lr, wd, seeds = 1e-3, 0.01, 0.1, [11, 12]
    grads, _ = zo_step(named, loss, seeds, eps, lr, wd)
    # by hand: z_j regenerated from each seed in tensor order; two-point estimates; decay on weights only
    expected_w, expected_b = w0.clone(), b0.clone()
    dir_w, dir_b = torch.zeros_like(w0), torch.zeros_like(b0)
    for seed, g in zip(seeds, grads):
        gen = torch.Generator().manual_seed(seed)
        zw, zb = torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen)

        def at(scale: float, zw: torch.Tensor = zw, zb: torch.Tensor = zb) -> float:
            return float(((w0 + scale * zw - target) ** 2).sum() + ((b0 + scale * zb) ** 2).sum())

        assert g == pytest.approx((at(eps) - at(-eps)) / (2 * eps), rel=1e-3, abs=1e-3)
        dir_w += g / 2 * zw
        dir_b += g / 2 * zb
    expected_w -= lr * (dir_w + wd * w0)
    expected_b -= lr * dir_b  # no weight decay on biases
    assert_rel_close(w, expected_w, 1e-5)
    assert_rel_close(bias, expected_b, 1e-5)


def test_perturbation_is_regenerated_not_stored() -> None:
    t = torch.zeros(4, 4)
    perturb([t], seed=5, scale=1.0)
    again = torch.zeros(4, 4)
    perturb([again], seed=5, scale=1.0)
    assert torch.equal(t, again) and t.abs().sum() > 0


@pytest.mark.parametrize("perturbations", [1, 3])
def test_seed_upload_replays_to_the_same_adapter_bit_for_bit(tmp_path: Path, perturbations: int) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{"adapter.dropout": 0.1}))
    sim, _ = build_simulation(cfg)
    client = sim.federation.clients[1]
    start = {k: v + 0.01 for k, v in sim.server.global_state.items()}
    common = dict(
        optimizer="sgd",
        lr=5e-3,
        weight_decay=0.01,
        local_steps=6,
        batch_size=2,
    )
    settings = LocalTrainingSettings(**common)
    zo = dict(eps=1e-3, perturbations=perturbations)
    weights = train_locally(sim.adapters, sim.encoder, client, start, settings, 42, [ZerothOrder(**zo)])
    seeds = train_locally(
        sim.adapters, sim.encoder, client, start, settings, 42, [ZerothOrder(**zo, upload="seeds")]
    )
    assert seeds.state[GRADS_KEY].shape == (6, perturbations)
    rebuilt = replay(start, seeds.state, eps=1e-3, weight_decay=0.01)
    assert rebuilt.keys() == weights.state.keys()
    assert all(torch.equal(rebuilt[k], weights.state[k]) for k in rebuilt)
    assert any(not torch.equal(rebuilt[k], start[k]) for k in rebuilt)
    assert all(p.grad is None for p in sim.adapters.model.parameters())  # no autograd, no optimizer state


def strategy_with(kind: str, clients: int = 6) -> Server:
    return Server(
        FedMeZO(FedMeZOOptions(lr_strategy=kind, lr_spread=0.5)),
        ServerSetup(
            {"m.lora_A.weight": torch.zeros(2, 3)},
            {i: RankProfile.uniform(2) for i in range(clients)},
            16.0,
            seed=1,
        ),
    )


def with_history(s: Server, history: dict[int, list[tuple[int, float, float]]]) -> None:
    """Give the server the (round, loss, drift) history of each client, as rounds would have left it."""
    s.state = s.state.evolve(facts={"history": {str(c): [list(e) for e in h] for c, h in history.items()}})


def scales(s: Server, server_round: int, clients: list[int]) -> dict[int, float]:
    """eta_i / eta under the relative spread."""
    directions = s.strategy.lr_directions(s.state, server_round, clients)
    return {c: 1.0 + s.strategy.options.lr_spread * u for c, u in directions.items()}


def test_personalised_learning_rates_any_number_of_clients_and_partial_participation() -> None:
    s = strategy_with("round-wise")
    assert scales(s, 1, [0, 1, 2]) == {0: 1.0, 1: 1.0, 2: 1.0}  # no history yet
    with_history(
        s,
        {
            0: [(1, 2.0, 0.1)],
            1: [(1, 4.0, 0.3)],
            2: [(2, 3.0, 0.9)],
            3: [(1, 9.0, 0.2), (2, 1.0, 0.5)],
        },
    )
    # sampled 0, 1, 3, 5: losses 2, 4, 1 (client 3's last), none for 5 -> mean 7/3; d = -1/3, 5/3, -4/3
    round_wise = scales(s, 3, [0, 1, 3, 5])
    assert round_wise[1] == pytest.approx(1.5) and round_wise[3] == pytest.approx(1 - 0.5 * 4 / 5)
    assert round_wise[0] == pytest.approx(1 - 0.5 * 1 / 5) and round_wise[5] == 1.0
    s.strategy.options = FedMeZOOptions(lr_strategy="five-round", lr_spread=0.5, lr_rules="fedlora")
    # client 3 over the last five rounds: mean(9, 1) = 5; client 0: 2 -> d = -1.5, +1.5
    five = scales(s, 3, [0, 3])
    assert five == {0: pytest.approx(0.5), 3: pytest.approx(1.5)}
    s.strategy.options = FedMeZOOptions(
        lr_strategy="five-round", lr_spread=0.5
    )  # reference: 5 rounds of history first
    assert scales(s, 3, [0, 3]) == {0: 1.0, 3: 1.0}
    s.strategy.options = FedMeZOOptions(lr_strategy="model-diff", lr_spread=0.5)
    drift = scales(s, 3, [0, 1, 2])  # drifts 0.1, 0.3, 0.9 -> d = -0.333, -0.133, 0.467
    assert drift[2] == pytest.approx(1.5) and drift[0] < drift[1] < 1.0
    s.strategy.options = FedMeZOOptions(lr_strategy="random", lr_spread=0.5)
    r = scales(s, 4, list(range(6)))
    assert r == scales(s, 4, list(range(6))) and all(0.5 <= v <= 1.5 for v in r.values())
    assert len(set(r.values())) == 6
    s.strategy.options = FedMeZOOptions(lr_strategy="frozen", lr_spread=0.5)
    assert set(scales(s, 4, [0, 1]).values()) == {1.0}


def test_reference_five_round_rule_waits_for_five_rounds_then_averages_the_last_five() -> None:
    s = strategy_with("five-round")
    assert s.strategy.options.lr_rules == "reference"  # the reference code's rules are the default
    with_history(
        s,
        {
            0: [(r, 1.0 + r, 0.0) for r in range(1, 5)],  # 4 rounds: no signal yet
            1: [(r, 10.0 * r, 0.0) for r in range(1, 7)],  # 6 rounds: mean of rounds 2..6 = 40
            2: [(r, 2.0, 0.0) for r in range(1, 6)],  # 5 rounds: mean 2
        },
    )
    assert (
        s.strategy.signal(s.state, 0, 7) is None
        and s.strategy.signal(s.state, 1, 7) == pytest.approx(40.0)
        and s.strategy.signal(s.state, 2, 7) == 2.0
    )
    # signals 40 and 2 -> d = +19, -19; client 0 keeps the base rate
    assert s.strategy.lr_directions(s.state, 7, [0, 1, 2]) == {
        0: 0.0,
        1: pytest.approx(1.0),
        2: pytest.approx(-1.0),
    }


def test_model_diff_drifts_against_a_direct_computation() -> None:
    gen = torch.Generator().manual_seed(0)
    start = {"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)}
    states = [
        {k: v + torch.randn(v.shape, generator=gen) * (i + 1) for k, v in start.items()} for i in range(3)
    ]
    weights = [0.5, 0.3, 0.2]
    u = [{k: (st[k] - start[k]).double() for k in start} for st in states]
    s = strategy_with("model-diff")
    reference = s.strategy.drifts(start, states, weights)  # per tensor, against the unweighted mean, summed
    for i in range(3):
        direct = sum(float(torch.linalg.norm(u[i][k] - (u[0][k] + u[1][k] + u[2][k]) / 3)) for k in start)
        assert reference[i] == pytest.approx(direct, rel=1e-9)
    s.strategy.options = FedMeZOOptions(lr_strategy="model-diff", lr_rules="fedlora")
    whole = s.strategy.drifts(start, states, weights)  # one vector, against the example-weighted mean
    flat = [torch.cat([x[k].flatten() for k in start]) for x in u]
    mean = sum(w * f for w, f in zip(weights, flat, strict=True))
    assert whole == pytest.approx([float(torch.linalg.norm(f - mean)) for f in flat], rel=1e-9)
    assert reference != pytest.approx(whole, rel=1e-3)


def test_absolute_spread_travels_as_an_offset_and_a_negative_rate_is_refused() -> None:
    s = strategy_with("round-wise")
    s.strategy.options = FedMeZOOptions(lr_strategy="round-wise", lr_delta=2e-4)
    with_history(s, {0: [(1, 1.0, 0.0)], 1: [(1, 3.0, 0.0)]})
    settings = s.strategy.lr_settings(s.state, 2, [0, 1, 2])
    assert settings == {0: {"lr_offset": pytest.approx(-2e-4)}, 1: {"lr_offset": pytest.approx(2e-4)}, 2: {}}
    base = LocalTrainingSettings(optimizer="sgd", lr=5e-4, lr_decay=0.5)
    # eta decays, Delta stays absolute: round 2 -> 5e-4 * 0.5 + 2e-4
    assert round_settings(replace(base, lr_offset=2e-4), 2).lr == pytest.approx(4.5e-4)
    with pytest.raises(ValueError, match="lr_delta"):
        round_settings(replace(base, lr_offset=-3e-4), 2)


def test_seed_uploads_are_tiny_and_a_bad_record_is_rejected(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **{
            "strategy.name": "fedmezo",
            "strategy.options": "{upload: seeds}",
            "client.local_steps": 5,
            "client.lr": 1e-3,
        },
    )
    sim, _ = build_simulation(load_config(None, overrides))
    engine = EmbeddedEngine(sim, tmp_path)
    original = engine.run_client
    victim = []

    def corrupt(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        if not victim:
            victim.append(client_id)
            reply.payload[GRADS_KEY][0, 0] = float("nan")
        return reply

    engine.run_client = corrupt
    record = engine.run_round(1)
    assert [r["client"] for r in record["rejected"]] == victim and "non-finite" in record["rejected"][0][
        "reason"
    ]
    assert record["bytes_up"] < record["bytes_down"] / 10  # seeds and scalars instead of the adapter
    reply = ClientReply(0, {"zo.seeds": torch.zeros(2, 2, dtype=torch.int64)}, 3)
    assert "needs" in sim.server.validate_reply(ClientInstruction(sim.server.global_state), reply)


@pytest.mark.parametrize("upload", ["weights", "seeds"])
def test_full_parameter_zeroth_order_exports_a_plain_model(tmp_path: Path, upload: str) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedlora.cli import main

    run_dir = tmp_path / f"full-{upload}"
    overrides = tiny_overrides(
        tmp_path,
        **{
            "strategy.name": "fedmezo",
            "strategy.options": f"{{full_parameters: true, upload: {upload}}}",
            "client.local_steps": 4,
            "client.lr": 1e-3,
        },
    )
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    weights = load_file(str(run_dir / "global" / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)
    base_folder = json.loads((run_dir / "run.json").read_text())["base_model"]
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "global")
    pretrained = AutoModelForCausalLM.from_pretrained(base_folder)
    changed = [
        n for n, p in tuned.named_parameters() if not torch.equal(p, dict(pretrained.named_parameters())[n])
    ]
    assert len(changed) == len(list(tuned.parameters()))  # every weight was tuned
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if upload == "seeds":  # a few hundred bytes up instead of the whole model
        assert records[0]["bytes_up"] < 5000 < records[0]["bytes_down"]


def test_zeroth_order_classification_with_a_trained_head(tmp_path: Path) -> None:
    """FedMeZO on a classification model: the LoRA factors and the task head move, loss is finite."""
    from conftest import tiny_engine

    data = tmp_path / "labels.jsonl"
    rows = [
        {
            "instruction": "",
            "input": f"text {i} " * (i % 5 + 1),
            "output": f"c{i % 3}",
            "category": f"k{i % 4}",
        }
        for i in range(80)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    engine = tiny_engine(
        tmp_path,
        **{
            "model.task": "classification",
            "data.source": "json",
            "data.path": str(data),
            "strategy.name": "fedmezo",
            "client.local_steps": 3,
            "client.lr": 1e-3,
        },
    )
    start = {k: v.clone() for k, v in engine.sim.server.global_state.items()}
    record = engine.run_round(1)
    assert record["rejected"] == [] and record["eval_accuracy"] is not None
    state = engine.sim.server.global_state
    head = [k for k in state if "score" in k]
    assert head and any(not torch.equal(state[k], start[k]) for k in head)


def test_fedlora_eval_of_a_full_parameter_run(tmp_path: Path, capsys) -> None:
    from fedlora.cli import main

    run_dir = tmp_path / "full"
    overrides = tiny_overrides(
        tmp_path,
        **{"strategy.name": "fedmezo", "strategy.options": "{full_parameters: true}", "federation.rounds": 1},
    )
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-6)
