"""Evaluating a finished run's global adapter, on its own data or on another data config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from fedlora.config.loader import apply_overrides
from fedlora.engine.checkpoint import latest_checkpoint
from fedlora.engine.evaluation import evaluate_personal, evaluate_state, write_predictions
from fedlora.engine.run_folder import (
    atomic_write_text,
)
from fedlora.engine.sampling import evaluation_clients
from fedlora.engine.setup import build_simulation
from fedlora.errors import ConfigError
from fedlora.preflight import config_from_dict
from fedlora.session.resume import load_run_config

DATA_SECTIONS = ("data", "partition", "federation", "eval")


def evaluate_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    split: str | None = None,
    data_config: Path | None = None,
) -> dict[str, float]:
    """Evaluate ``run_dir/global`` on the run's data config, or on another one.

    ``data_config``: a YAML file whose data/partition/federation/eval sections replace the run's (the model,
    adapter and strategy stay the run's); then ``overrides``; then ``split``.
    """
    adapter_file = run_dir / "global" / "adapter_model.safetensors"
    model_file = run_dir / "global" / "model.safetensors"  # a full-parameter run's tuned model
    if not adapter_file.exists() and not model_file.exists():
        raise ConfigError(f"{run_dir} has no global adapter yet (global/adapter_model.safetensors)")
    tree = load_run_config(run_dir).model_dump(mode="json")
    if data_config is not None:
        other = yaml.safe_load(Path(data_config).read_text()) or {}
        foreign = sorted(set(other) - set(DATA_SECTIONS) - {"name"})
        if foreign:
            raise ConfigError(
                f"{data_config}: an evaluation data config may only hold {', '.join(DATA_SECTIONS)}; it also has {foreign}"
            )
        tree.update({k: v for k, v in other.items() if k in DATA_SECTIONS})
    apply_overrides(tree, [*(overrides or []), *([f"eval.split={split}"] if split else [])])
    cfg = config_from_dict(tree)
    sim, _ = build_simulation(cfg, for_training=False)
    names = list(dict.fromkeys([*cfg.eval.metrics, *cfg.eval.final_metrics]))
    clients = evaluation_clients(cfg.eval, cfg.federation.seed, sim.federation, final=True)
    if sim.client_models is not None:  # personalised: each client's newest weights with what is shared
        sim.client_models.folder = run_dir / "personal"
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is not None:  # the whole server state: a head, prototypes, each client's own adapter...
            sim.strategy.load_server_state(checkpoint.tensors)
            sim.strategy.load_server_meta(checkpoint.meta)
            return evaluate_personal(sim, clients, names, before_round=checkpoint.round + 1)
        sim.strategy.load_server_state(sim.client_models.to_shared(load_file(str(adapter_file))))
        return evaluate_personal(sim, clients, names, before_round=cfg.federation.rounds + 1)
    if not adapter_file.exists():
        tuned = load_file(str(model_file))  # saved with plain names; the live model's carry ".base_layer"
        state = {n: tuned[n.replace(".base_layer", "")] for n, _ in sim.adapters.base_parameters()}
    else:
        try:
            state = load_file(str(adapter_file))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ConfigError(
                f"{adapter_file} is damaged ({err}); re-export it with fedlora run --resume"
            ) from None
    predictions: list[dict[str, Any]] = []
    metrics = evaluate_state(sim, state, clients, names, predictions)
    folder = run_dir / "eval"  # what was measured, and what the model said, kept in the run
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / f"{cfg.eval.split}.json", json.dumps(metrics, indent=1) + "\n")
    if predictions:
        write_predictions(folder / f"{cfg.eval.split}.predictions.jsonl", predictions)
    return metrics
