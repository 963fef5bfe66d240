"""Refusals that hold however the config was made, and nothing private released under DP."""

import json
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig
from fedlora.runner import run_experiment

DP = {"privacy.enabled": "true", "privacy.noise_multiplier": 1.0}


def with_privacy(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same config with DP switched on in Python, skipping the YAML loader."""
    return cfg.model_copy(
        update={"privacy": cfg.privacy.model_copy(update={"enabled": True, "noise_multiplier": 1.0})}
    )


REFUSED = [
    ({"strategy.name": "fedmezo"}, "zeroth-order steps have no DP-SGD mechanism"),
    ({"strategy.name": "fedmezo", "strategy.options": "{upload: seeds}"}, "zeroth-order"),
    ({"strategy.name": "fedprox"}, "cannot carry FedProx's proximal term"),
    ({"strategy.name": "flexlora", "strategy.options": "{local: fedprox}"}, "FedProx's proximal term"),
    ({"strategy.name": "hetlora", "strategy.options": "{prune_penalty: 0.1}"}, "HetLoRA's rank penalty"),
]


@pytest.mark.parametrize("extra,reason", REFUSED)
def test_dp_refusals_hold_for_yaml_and_python_configs(tmp_path: Path, extra: dict, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        load_config(None, tiny_overrides(tmp_path, **extra, **DP))
    cfg = with_privacy(load_config(None, tiny_overrides(tmp_path, **extra)))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=reason):
        run_experiment(cfg, run_dir, show_progress=False)
    assert not run_dir.exists()  # refused before any work


def test_pfedlora_with_privacy_is_refused(tmp_path: Path) -> None:
    variants = {
        "model.name": "all-minilm-l6-v2",
        "model.task": "classification",
        "model.variants": "[{num_layers: 2}]",
        "strategy.name": "pfedlora",
        "data.source": "bbc-news",
    }
    for share in ("adapter", "model"):
        overrides = tiny_overrides(tmp_path, **variants, **{"strategy.options": f"{{share: {share}}}"}, **DP)
        with pytest.raises(
            ConfigError, match="pfedlora cannot run under DP-SGD: phase 1 trains the local model"
        ):
            load_config(None, overrides)


def test_dp_replies_release_no_loss_or_token_counts(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path, **DP, **{"adapter.target_modules": "[q_proj, v_proj]", "federation.rounds": 1}
    )
    run_dir = run_experiment(load_config(None, overrides), tmp_path / "dp", show_progress=False)
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["train_loss"] is None and record["num_clients"] == 2
    for client in record["clients"]:
        assert "train_loss" not in client and "tokens" not in client and "train_seconds" not in client
        assert "peak_rss_mb" not in client  # memory, like time, depends on the private batches' lengths
        assert client["steps"] == 2 and client["epsilon"] > 0
