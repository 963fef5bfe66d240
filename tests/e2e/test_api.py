"""The public API and the open registries: docs/api.md's plugin (a strategy, a data source, a metric) runs,
survives --resume and eval in fresh processes, and its strategy is exactly what it says."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fedlora
from conftest import REPO, assert_rel_close
from fedlora.adapters.ranks import RankProfile
from fedlora.data.sources import reasoning_gym_examples
from fedlora.engine.server import Server
from fedlora.testing import check_strategy

EXAMPLES = REPO / "examples"
PLUGIN = EXAMPLES / "my_plugin.py"


def test_the_api_page_shows_the_plugin_that_is_tested() -> None:
    page = (REPO / "docs" / "api.md").read_text()
    assert PLUGIN.read_text().strip() in page  # the page's example is this file, verbatim


def write_csv(path: Path) -> Path:
    """Real data: reasoning-gym problems, one category (client) per task."""
    examples = reasoning_gym_examples(["basic_arithmetic", "gcd", "lcm"], 12, seed=3)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "output", "category"])
        writer.writeheader()
        for e in examples:
            writer.writerow({"instruction": e.instruction, "output": e.output, "category": e.category})
    return path


def plugin_config(tmp_path: Path, rounds: int) -> Path:
    config = tmp_path / "plugin.yaml"
    config.write_text(
        f"""
name: plugin-demo
plugins: [my_plugin]
model: {{name: tiny-llama}}
data: {{source: csv, path: {write_csv(tmp_path / "data.csv")}, max_seq_len: 96}}
federation: {{rounds: {rounds}, clients_per_round: 2}}
client: {{local_steps: 2, batch_size: 2, lr: 0.001}}
adapter: {{rank: 4}}
strategy: {{name: fedavgm, options: {{momentum: 0.5}}}}
eval: {{metrics: [loss, worst-client-loss]}}
output: {{plot: false}}
"""
    )
    return config


def fedlora_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "fedlora.cli", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_plugin_runs_resumes_and_evaluates_in_fresh_processes(tmp_path: Path) -> None:
    config = plugin_config(tmp_path, rounds=1)
    run_dir = tmp_path / "run"
    first = fedlora_cli("run", str(config), "--output", str(run_dir), "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = fedlora_cli("run", "--resume", str(run_dir), "federation.rounds=2", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["eval_worst_client_loss"] >= r["eval_loss"] for r in records)
    evaluated = fedlora_cli("eval", str(run_dir))
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert "worst_client_loss" in evaluated.stdout + evaluated.stderr

    # the same two rounds in one go end with the same adapter (the server momentum survived the resume)
    straight = fedlora_cli(
        "run", str(plugin_config(tmp_path, rounds=2)), "--output", str(tmp_path / "s"), "--no-progress"
    )
    assert straight.returncode == 0, straight.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "s" / "global" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedavgm_rule_against_a_direct_computation() -> None:
    sys.path.insert(0, str(EXAMPLES))
    try:
        import my_plugin
    finally:
        sys.path.remove(str(EXAMPLES))
    gen = torch.Generator().manual_seed(0)
    start = {"m.lora_A.weight": torch.randn(2, 5, generator=gen, dtype=torch.float64)}
    strategy = my_plugin.FedAvgM(my_plugin.FedAvgMOptions(momentum=0.5, server_lr=0.8))
    server = Server(
        strategy, fedlora.ServerSetup(start, {0: RankProfile.uniform(2), 1: RankProfile.uniform(2)}, 8.0)
    )
    theta, v = start["m.lora_A.weight"].clone(), torch.zeros(2, 5, dtype=torch.float64)
    for server_round in (1, 2):
        states = [
            {"m.lora_A.weight": torch.randn(2, 5, generator=gen, dtype=torch.float64)} for _ in range(2)
        ]
        replies = [fedlora.ClientReply(i, s, n) for i, (s, n) in enumerate(zip(states, [1, 3]))]
        out = server.aggregate(server_round, replies)
        mean = 0.25 * states[0]["m.lora_A.weight"] + 0.75 * states[1]["m.lora_A.weight"]
        v = 0.5 * v + (mean - theta)
        theta = theta + 0.8 * v
        assert_rel_close(out["m.lora_A.weight"], theta, 1e-12)


def test_run_returns_a_result_and_takes_a_federation_object(tmp_path: Path) -> None:
    from conftest import tiny_overrides
    from fedlora.data.federation import build_federation

    cfg = fedlora.load_config(None, tiny_overrides(tmp_path, **{"federation.rounds": 1}))
    federation = build_federation(cfg)  # a user's own clients, built however they like
    result = fedlora.run(cfg, tmp_path / "api", show_progress=False, federation=federation)
    assert isinstance(result, fedlora.RunResult) and result.run_dir == tmp_path / "api"
    assert len(result.records) == 1 and result.metrics["round"] == 1 and "clients" not in result.metrics
    exported = tmp_path / "api" / "global" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    saved = load_file(str(exported))
    assert all(torch.equal(saved[k], result.final_state[k].contiguous()) for k in saved)


def test_unknown_names_say_how_to_register(tmp_path: Path) -> None:
    import pytest

    from conftest import tiny_overrides

    for key, value in (("strategy.name", "nope"), ("data.source", "nope"), ("eval.metrics", "[nope]")):
        with pytest.raises(fedlora.ConfigError, match="nope"):
            fedlora.load_config(None, tiny_overrides(tmp_path, **{key: value}))
    with pytest.raises(fedlora.ConfigError, match="cannot import 'no_such_plugin'"):
        fedlora.load_config(None, tiny_overrides(tmp_path, plugins="[no_such_plugin]"))


def test_a_registered_model_runs(tmp_path: Path) -> None:
    """A model registered by name (here a narrower tiny LLaMA built locally) is what model.name finds."""
    from conftest import tiny_overrides
    from fedlora.models.loading import MODELS
    from fedlora.models.registry import cache_root
    from fedlora.models.tiny import tiny_llama_folder

    if "tiny-llama-32" not in MODELS:

        @fedlora.register_model("tiny-llama-32")
        def narrow(model_cfg):  # noqa: ANN001, ANN202
            return tiny_llama_folder(cache_root(model_cfg.cache_dir), 32, 2)

    cfg = fedlora.load_config(
        None, tiny_overrides(tmp_path, **{"model.name": "tiny-llama-32", "federation.rounds": 1})
    )
    result = fedlora.run(cfg, tmp_path / "m", show_progress=False)
    a = next(v for k, v in result.final_state.items() if "lora_A" in k)
    assert a.shape[1] == 32  # the registered model's hidden size


def test_run_takes_a_datasets_dataset(tmp_path: Path) -> None:
    """A Hugging Face ``datasets.Dataset`` (made here from real reasoning-gym problems) goes straight in;
    the config's partition section splits it (natural: one client per category)."""
    from datasets import Dataset

    from conftest import tiny_overrides

    examples = reasoning_gym_examples(["gcd", "lcm", "basic_arithmetic"], 10, seed=4)
    rows = Dataset.from_list(
        [{"instruction": e.instruction, "output": e.output, "category": e.category} for e in examples]
    )
    cfg = fedlora.load_config(None, tiny_overrides(tmp_path, **{"federation.rounds": 1}))
    result = fedlora.run(cfg, tmp_path / "ds", show_progress=False, dataset=rows)
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert sorted(c["name"] for c in clients) == ["basic_arithmetic", "gcd", "lcm"]
    assert (
        "a dataset given in Python (30 rows)" in json.loads((result.run_dir / "run.json").read_text())["data"]
    )


def test_the_library_api_is_quiet(tmp_path: Path) -> None:
    """fedlora.run from Python shows fedlora's own lines only: no transformers loading bars, no
    flwr-datasets partition bar, no library FutureWarnings (in a fresh process without the tests' quiet
    environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "TRANSFORMERS_VERBOSITY")}
    code = (
        "import fedlora; cfg = fedlora.load_config(None, ['model.name=tiny-llama', 'data.examples_per_task=8', "
        f"'federation.rounds=1', 'client.local_steps=1', 'output.plot=false', 'output.dir={tmp_path / 'r'}']); "
        "fedlora.run(cfg, show_progress=False); fedlora.evaluate(cfg.output.dir)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    noise = [
        s for s in ("Loading weights", "Generating partition", "FutureWarning", "it/s]") if s in done.stderr
    ]
    assert noise == [], done.stderr[-2000:]


def test_a_plugin_strategy_passes_the_conformance_suite_with_one_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a plugin author runs on their own method: every conformance check (fedlora.testing)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import my_plugin  # noqa: F401  (registers fedavgm)

    check_strategy("fedavgm", tmp_path, extra={"plugins": "[my_plugin]"})
