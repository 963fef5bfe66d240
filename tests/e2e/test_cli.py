"""End to end through the CLI on tiny-llama: run, resume, eval, export."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import assert_rel_close, tiny_overrides
from fedlora.cli import main
from fedlora.engine import embedded


def global_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "global" / "adapter_model.safetensors"))


def test_run_writes_complete_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"output.plot": "true", "federation.clients_per_round": 2})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (
        cfg["model"]["name"] == "tiny-llama"
        and cfg["federation"]["rounds"] == 2
        and cfg["client"]["batch_size"] == 2
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        for key in (
            "round",
            "train_loss",
            "eval_loss",
            "eval_perplexity",
            "num_clients",
            "bytes_up",
            "bytes_down",
            "seconds",
        ):
            assert r[key] is not None, key
        assert r["num_clients"] == 2 and r["bytes_up"] == sum(c["bytes_up"] for c in r["clients"]) > 0
        assert r["bytes_down"] == r["bytes_up"]  # fedit: same layout both ways
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert (run_dir / "checkpoints" / "round_2" / "server_state.safetensors").exists()
    assert json.loads((run_dir / "global" / "adapter_config.json").read_text())["r"] == 4
    assert len(json.loads((run_dir / "clients.json").read_text())) == 4
    # the exported adapter is a plain PEFT adapter
    base = AutoModelForCausalLM.from_pretrained(
        json.loads((run_dir / "global" / "adapter_config.json").read_text())["base_model_name_or_path"]
    )
    PeftModel.from_pretrained(base, str(run_dir / "global"))
    # refusing to overwrite a run
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 2


def test_training_lowers_held_out_loss(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        tmp_path, **{"federation.rounds": 4, "client.local_steps": 6, "client.lr": 3e-3, "adapter.rank": 8}
    )
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] - 0.1


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_other_strategies_run(tmp_path: Path, strategy: str) -> None:
    run_dir = tmp_path / strategy
    overrides = tiny_overrides(
        tmp_path, **{"strategy.name": strategy, "federation.rounds": 1, "client.lr": 0.05}
    )
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "global" / "adapter_model.safetensors").exists()


HETERO_RANKS = {
    "resources.distribution": "uniform",
    "resources.rank_scale": 0.1,
    "federation.clients_per_round": 3,
}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {**HETERO_RANKS, "strategy.name": "flexlora"},
        {
            **HETERO_RANKS,
            "strategy.name": "hetlora",
            "strategy.options": "{prune_rule: threshold, prune_threshold: 1.0e+6, prune_gamma: 0.5}",
        },
        {"strategy.name": "ffa-lora", "privacy.enabled": "true", "privacy.target_epsilon": 4.0},
        {"strategy.name": "fedmezo", "strategy.options": "{upload: seeds, lr_strategy: round-wise}"},
        {
            "strategy.name": "pfedlora",
            "model.tiny_num_layers": 3,
            "model.variants": "[{num_layers: 3}, {num_layers: 1}]",
            "adapter.target_modules": "[q_proj, v_proj]",
        },
    ],
    ids=["fedit", "flexlora", "hetlora-pruning", "ffa-lora-dp", "fedmezo-seeds", "pfedlora"],
)
def test_resume_gives_same_adapter_as_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict
) -> None:
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 3, "adapter.dropout": 0.1, **extra})
    straight = tmp_path / "straight"
    assert main(["run", *overrides, "--output", str(straight), "--no-progress"]) == 0

    crashed = tmp_path / "crashed"
    original = embedded.EmbeddedEngine.run_round

    def crash_in_round_3(self: embedded.EmbeddedEngine, server_round: int) -> dict:
        if server_round == 3:
            raise KeyboardInterrupt("simulated crash")
        return original(self, server_round)

    monkeypatch.setattr(embedded.EmbeddedEngine, "run_round", crash_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        main(["run", *overrides, "--output", str(crashed), "--no-progress"])
    assert not (crashed / "global").exists()
    monkeypatch.setattr(embedded.EmbeddedEngine, "run_round", original)
    assert main(["run", "--resume", str(crashed), "--no-progress"]) == 0

    a, b = global_adapter(straight), global_adapter(crashed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rounds = [json.loads(line)["round"] for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]
    if "privacy.enabled" in extra:  # the accountant goes on counting after the resume
        straight_eps, crashed_eps = (
            json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])["epsilon_max"]
            for d in (straight, crashed)
        )
        assert straight_eps == crashed_eps > 0


def test_eval_and_export_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert (
        main(
            [
                "run",
                *tiny_overrides(tmp_path, **{"federation.rounds": 1}),
                "--output",
                str(run_dir),
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "test"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval_examples"] > 0 and metrics["eval_loss"] > 0
    other = tmp_path / "other.yaml"
    other.write_text(
        "data:\n  source: reasoning-gym\n  tasks: [spell_backward]\n  examples_per_task: 10\n  max_seq_len: 96\n"
    )
    assert main(["eval", str(run_dir), "--data", str(other)]) == 0
    on_other = json.loads(capsys.readouterr().out)
    assert on_other["eval_clients"] == 1 and on_other["eval_loss"] != metrics["eval_loss"]
    other.write_text("adapter:\n  rank: 2\n")
    assert main(["eval", str(run_dir), "--data", str(other)]) == 2
    merged = tmp_path / "merged"
    assert main(["export", str(run_dir), "--merged", str(merged)]) == 0
    ids = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        full = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
        cfg = json.loads((run_dir / "global" / "adapter_config.json").read_text())
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]), str(run_dir / "global")
        )
        assert_rel_close(full, peft_model(input_ids=ids).logits, 1e-5)


def test_bad_config_fails_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["run", "model.name=tiny-llama", "client.optimizer=adam", "--output", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err
    assert "client.optimizer" in err and "'adamw'" in err
    assert not (tmp_path / "x").exists()
    # a check that needs the data: more clients per round than the 4 task clients
    assert (
        main(
            [
                "run",
                *tiny_overrides(tmp_path, **{"federation.clients_per_round": 9}),
                "--output",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "clients_per_round (9) is above the 4 clients" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_eval_keeps_its_figures_and_what_the_model_said(tmp_path: Path, capsys) -> None:
    """Overrides after --split work; eval writes eval/<split>.json and <split>.predictions.jsonl in the run,
    and a run's final generation metrics keep their predictions (eval/final.predictions.jsonl)."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"eval.final_metrics": "[rouge-l]", "eval.max_new_tokens": 4})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    final = [
        json.loads(line) for line in (run_dir / "eval" / "final.predictions.jsonl").read_text().splitlines()
    ]
    assert final and {"client", "instruction", "reference", "generation", "rouge_l"} <= set(final[0])
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--split", "test", "eval.metrics=[loss, exact-match]"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run_dir / "eval" / "test.json").read_text())
    assert stored == printed and "eval_exact_match" in stored and "eval_loss" in stored
    lines = (run_dir / "eval" / "test.predictions.jsonl").read_text().splitlines()
    assert len(lines) == stored["eval_generated"] and "exact_match" in json.loads(lines[0])
    # --base: the base model's figures and, beside each of the adapter's generations, the base model's
    assert main(["eval", str(run_dir), "--split", "test", "--base", "eval.metrics=[loss, exact-match]"]) == 0
    err = capsys.readouterr().err
    assert "s] evaluating the base model (the untrained adapter) on the same examples" in err
    stored = json.loads((run_dir / "eval" / "test.json").read_text())
    assert "base_eval_exact_match" in stored and "base_eval_loss" in stored
    rows = [
        json.loads(line) for line in (run_dir / "eval" / "test.predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == stored["eval_generated"]
    assert all({"generation", "base_generation", "exact_match", "base_exact_match"} <= set(r) for r in rows)
    with pytest.raises(SystemExit) as stopped:  # anything else after the options is still an error
        main(["eval", str(run_dir), "--split", "test", "--bogus"])
    assert stopped.value.code == 2


def test_no_progress_still_prints_one_line_per_round(tmp_path: Path, capsys) -> None:
    assert main(["run", *tiny_overrides(tmp_path), "--output", str(tmp_path / "r"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "round 1/2: train" in err and "round 2/2: train" in err


def test_a_run_from_overrides_alone_starts_from_the_schema_defaults(tmp_path: Path) -> None:
    """Not from the demo experiment: its caps (4 eval examples a client, 128 tokens) and name do not apply."""
    run_dir = tmp_path / "run"
    assert main(["run", *tiny_overrides(tmp_path), "--output", str(run_dir), "--no-progress"]) == 0
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["name"] == "fedit-reasoning-gym"
    assert cfg["data"]["max_eval_examples_per_client"] is None and cfg["data"]["examples_per_task"] == 16
    assert cfg["data"]["tasks"] == ["basic_arithmetic", "chain_sum", "gcd", "lcm"]


def test_eval_refuses_training_keys_keeps_other_data_apart_and_has_a_base_row(tmp_path: Path, capsys) -> None:
    """A training key is refused (not ignored); an evaluation on other data goes to its own file; --base
    adds the base model's figures; flags may stand between overrides."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path)
    assert main(["run", *overrides[:3], "--no-progress", *overrides[3:], "--output", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["eval", str(run_dir), "client.lr=0.1"]) == 2
    assert "client.lr is not an evaluation setting" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--base"]) == 0
    own = json.loads(capsys.readouterr().out)
    assert own["base_eval_loss"] > own["eval_loss"] and (run_dir / "eval" / "eval.json").exists()
    before = (run_dir / "eval" / "eval.json").read_bytes()
    assert main(["eval", str(run_dir), "data.examples_per_task=8"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert json.loads((run_dir / "eval" / "eval@data.examples_per_task=8.json").read_text()) == other
    assert (run_dir / "eval" / "eval.json").read_bytes() == before
