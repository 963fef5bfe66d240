"""FlexLoRA / HetLoRA end to end on tiny-llama with clients of different ranks."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_rel_close, tiny_overrides
from fedlora import load_config
from fedlora.adapters.ranks import profile_of_state
from fedlora.cli import main
from fedlora.engine.embedded import EmbeddedEngine, sample_clients
from fedlora.runner import build_simulation

# tiny-llama: hidden 64, MLP 128 -> the paper types scaled by 0.1: r1, r3, a3-m20, r20
HETERO = {
    "resources.distribution": "uniform",
    "resources.rank_scale": 0.1,
    "adapter.target_modules": "all-linear",
    "federation.clients_per_round": 4,
}


@pytest.mark.parametrize(
    ("strategy", "use_rslora"), [("flexlora", False), ("hetlora", False), ("flexlora", True)]
)
def test_heterogeneous_run_exports_a_plain_peft_adapter(
    tmp_path: Path, strategy: str, use_rslora: bool
) -> None:
    run_dir = tmp_path / strategy
    overrides = tiny_overrides(
        tmp_path, **HETERO, **{"strategy.name": strategy, "adapter.use_rslora": str(use_rslora).lower()}
    )
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    clients = json.loads((run_dir / "clients.json").read_text())
    assert sorted(c["rank"] for c in clients) == ["a3-m20", "r1", "r20", "r3"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_client = {c["client"]: c["rank"] for c in clients}
    for record in records:
        assert record["num_clients"] == 4 and record["rejected"] == []
        assert all(c["rank"] == by_client[c["client"]] for c in record["clients"])
        # each client is sent its own rank's truncation, as large as the reply it trains at that rank
        assert record["bytes_down"] == sum(c["bytes_up"] for c in record["clients"])
        assert len({c["bytes_up"] for c in record["clients"]}) > 1  # and the ranks really differ
    exported = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    assert profile_of_state(exported).name == "r20"  # the global adapter is kept at r_max per kind
    config = json.loads((run_dir / "global" / "adapter_config.json").read_text())
    folder = json.loads((run_dir / "run.json").read_text())["base_model"]
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        plain = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(folder), str(run_dir / "global")
        )
        theirs = plain.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(folder)
        modules = dict(base.named_modules())
        assert config["use_rslora"] is use_rslora
        for key, A in exported.items():  # W0 + s_r B A merged by hand: s_r = alpha / r, or alpha / sqrt(r)
            if ".lora_A." in key:
                path = key.split(".lora_A.", 1)[0].removeprefix("base_model.model.")
                B = exported[key.replace("lora_A", "lora_B")]
                rank = A.shape[0] ** 0.5 if use_rslora else A.shape[0]
                modules[path].weight += config["lora_alpha"] / rank * B @ A
        ours = base(input_ids=ids).logits
    assert_rel_close(theirs, ours, 1e-5)


def test_mixed_attention_mlp_profile_exports_with_rank_pattern(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **{
            **HETERO,
            "strategy.name": "flexlora",
            "resources.distribution": "custom",
            "resources.rank_types": "[{attention: 2, mlp: 6}, 4]",
            "resources.shares": "[1, 1]",
            "resources.rank_scale": 1,
            "federation.rounds": 1,
        },
    )
    run_dir = tmp_path / "mixed"
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    config = json.loads((run_dir / "global" / "adapter_config.json").read_text())
    assert config["r"] == 4 and list(config["rank_pattern"].values()) == [6]
    plain = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(json.loads((run_dir / "run.json").read_text())["base_model"]),
        str(run_dir / "global"),
    )
    ranks = {n: m.r["default"] for n, m in plain.named_modules() if hasattr(m, "r") and "default" in m.r}
    assert {r for n, r in ranks.items() if "mlp" in n} == {6} and {
        r for n, r in ranks.items() if "attn" in n
    } == {4}


def test_reply_at_the_wrong_rank_is_rejected_and_the_round_goes_on(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **HETERO, **{"strategy.name": "flexlora"}))
    sim, _ = build_simulation(cfg)
    engine = EmbeddedEngine(sim, tmp_path)
    victim = sample_clients(4, 4, cfg.federation.seed, 1)[0]
    original = engine.run_client

    def wrong_rank(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        if client_id == victim:
            rank = sim.server.client_profiles[client_id].attention
            reply.payload = {
                k: torch.cat([v, v[:1]]) if ".lora_A." in k else torch.cat([v, v[:, :1]], dim=1)
                for k, v in reply.payload.items()
            }
            assert profile_of_state(reply.payload).attention == rank + 1
        return reply

    monkeypatch.setattr(engine, "run_client", wrong_rank)
    record = engine.run_round(1)
    assert record["num_clients"] == 3 and [r["client"] for r in record["rejected"]] == [victim]
    assert "but the client was given rank" in record["rejected"][0]["reason"]
    assert all(torch.isfinite(v).all() for v in sim.server.global_state.values())


def test_rank_above_module_size_is_refused_before_training(tmp_path: Path) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, **{**HETERO, "resources.rank_scale": 1.0}))
    with pytest.raises(ValueError, match=r"rank 200 on .* modules is above min\(d, k\) = 64"):
        build_simulation(cfg)


def test_hetlora_self_pruning_lowers_a_clients_rank(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **HETERO,
        **{
            "strategy.name": "hetlora",
            "strategy.options": "{prune_penalty: 0.1, prune_gamma: 0.5, prune_rule: threshold, prune_threshold: 1.0e+6}",
            "federation.rounds": 1,
        },
    )
    cfg = load_config(None, overrides)
    sim, _ = build_simulation(cfg)
    before = dict(sim.server.client_profiles)
    record = EmbeddedEngine(sim, tmp_path).run_round(1)
    assert record["rejected"] == [] and record["num_clients"] == 4
    for cid, profile in before.items():
        assert sim.server.client_profiles[cid] == profile.pruned(0.5)


def test_flexlora_final_evaluation_also_measures_the_untruncated_delta(tmp_path: Path) -> None:
    from conftest import tiny_engine
    from fedlora.engine.embedded import evaluate_model

    engine = tiny_engine(
        tmp_path, **HETERO, **{"strategy.name": "flexlora", "strategy.options": "{evaluate_full_delta: true}"}
    )
    replies = []
    original = engine.run_client

    def spy(server_round, client_id, instruction):
        reply = original(server_round, client_id, instruction)
        replies.append(reply)
        return reply

    engine.run_client = spy
    engine.run_round(1)
    figures = engine.evaluate(final=True)
    # the direct computation: W0 + sum_i p_i (alpha / r_i) B_i A_i on a fresh copy of the base model
    base = AutoModelForCausalLM.from_pretrained(engine.sim.adapters.model.get_base_model().name_or_path)
    modules = dict(base.named_modules())
    total = sum(r.num_examples for r in replies)
    alpha = engine.sim.adapters.cfg.alpha
    with torch.no_grad():
        for reply in replies:
            for key, A in reply.payload.items():
                if ".lora_A." in key:
                    path = key.split(".lora_A.", 1)[0].removeprefix("base_model.model.")
                    B = reply.payload[key.replace("lora_A", "lora_B")]
                    modules[path].weight += reply.num_examples / total * alpha / A.shape[0] * B @ A
    clients = engine.final_eval_clients
    direct = evaluate_model(engine.sim, base.eval(), clients, ["loss"])["eval_loss"]
    assert abs(figures["eval_loss_full_delta"] - direct) <= 1e-5 * abs(direct)
    ranks = sorted(r.payload[next(k for k in r.payload if ".lora_A." in k)].shape[0] for r in replies)
    assert sum(ranks) > ranks[-1]  # Delta's rank can pass r_max: the truncation is an approximation here
    # the shared model is the truncated global model again, its base weights pristine
    assert engine.evaluate(final=True)["eval_loss"] == figures["eval_loss"]


def test_flexlora_untruncated_delta_survives_a_checkpoint(tmp_path: Path) -> None:
    """A run resumed after its last round (a crash during the final evaluation) still measures W0 + Delta:
    the untruncated factors travel in the server state, the round in its metadata."""
    from conftest import tiny_engine

    options = {"strategy.name": "flexlora", "strategy.options": "{evaluate_full_delta: true}"}
    first = tiny_engine(tmp_path / "a", **HETERO, **options)
    first.run_round(1)
    figures = first.evaluate(final=True)
    tensors, meta = first.sim.server.checkpoint()
    assert any(k.startswith("full_delta_us/") for k in tensors)
    assert meta["server_state"]["facts"]["full_delta_round"] == 1

    resumed = tiny_engine(tmp_path / "b", **HETERO, **options)
    assert resumed.sim.server.extra_evaluation_states() == {}  # nothing aggregated in this process
    resumed.sim.server.restore(tensors, meta)
    again = resumed.evaluate(final=True)
    assert again["eval_loss_full_delta"] == figures["eval_loss_full_delta"]
    assert again["eval_loss"] == figures["eval_loss"]
