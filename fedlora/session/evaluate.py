"""Evaluating a finished run's global adapter, on its own data or on another data config."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from fedlora.config.loader import apply_overrides
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.checkpoint import latest_checkpoint
from fedlora.engine.evaluation import evaluate_personal, evaluate_state, write_predictions
from fedlora.engine.run_folder import atomic_write_text, config_changes
from fedlora.engine.sampling import evaluation_clients
from fedlora.engine.setup import assemble_simulation
from fedlora.errors import ConfigError
from fedlora.preflight import config_from_dict
from fedlora.session.resume import load_run_config

DATA_SECTIONS = ("data", "partition", "federation", "eval")
#: what ``fedlora eval`` overrides may change: the data and how it is evaluated, and where it runs
EVAL_KEYS = (*DATA_SECTIONS, "compute")


def check_eval_overrides(overrides: list[str]) -> None:
    """ConfigError for an override outside :data:`EVAL_KEYS` (it would change training, not evaluation)."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.split(".", 1)[0] not in EVAL_KEYS:
            raise ConfigError(
                f"fedlora eval {item}: {key} is not an evaluation setting (the model, adapter and training are the "
                f"run's); eval takes {', '.join(k + '.*' for k in EVAL_KEYS)}"
            )


def evaluation_name(
    split: str, run: ExperimentConfig, cfg: ExperimentConfig, data_config: Path | None
) -> str:
    """The file stem of an evaluation: ``split`` on the run's own data, ``split@<data>`` on other data
    (the ``--data`` file's stem, else the changed data settings), so that one never overwrites the other."""
    changed = {
        k: v
        for k, v in config_changes(run, cfg).items()
        if k.split(".", 1)[0] in ("data", "partition", "federation")
    }
    if not changed and data_config is None:
        return split
    tag = (
        Path(data_config).stem
        if data_config is not None
        else "_".join(f"{k}={v[1]}" for k, v in changed.items())
    )
    return f"{split}@{re.sub(r'[^A-Za-z0-9._=-]+', '-', tag).strip('-')[:80]}"


def evaluate_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    split: str | None = None,
    data_config: Path | None = None,
    base: bool = False,
) -> dict[str, float]:
    """Evaluate ``run_dir/global`` on the run's data config, or on another one, into
    ``run_dir/eval/<name>.json`` (:func:`evaluation_name`).

    ``data_config``: a YAML file whose data/partition/federation/eval sections replace the run's (the model,
    adapter and strategy stay the run's); then ``overrides`` (evaluation settings only:
    :func:`check_eval_overrides`); then ``split``. ``base``: the same metrics of the untrained adapter (the
    base model; with a classification head, its untrained head) too, as ``base_*`` keys.
    """
    check_eval_overrides(overrides or [])
    adapter_file = run_dir / "global" / "adapter_model.safetensors"
    model_file = run_dir / "global" / "model.safetensors"  # a full-parameter run's tuned model
    if not adapter_file.exists() and not model_file.exists():
        raise ConfigError(f"{run_dir} has no global adapter yet (global/adapter_model.safetensors)")
    run_cfg = load_run_config(run_dir)
    tree = run_cfg.model_dump(mode="json")
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
    sim, _ = assemble_simulation(cfg, for_training=False)
    names = list(dict.fromkeys([*cfg.eval.metrics, *cfg.eval.final_metrics]))
    clients = evaluation_clients(cfg.eval, cfg.federation.seed, sim.federation, final=True)
    if sim.client_models is not None:  # personalised: each client's newest weights with what is shared
        sim.client_models.folder = run_dir / "personal"
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is not None:  # the whole server state: a head, prototypes, each client's own adapter...
            sim.server.restore(checkpoint.tensors, checkpoint.meta)
            return evaluate_personal(sim, clients, names, before_round=checkpoint.round + 1)
        sim.server.load_global_adapter(sim.client_models.to_shared(load_file(str(adapter_file))))
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
    if base:
        untrained = evaluate_state(sim, sim.adapters.initial_state(), clients, names)
        metrics.update({f"base_{k}": v for k, v in untrained.items()})
    folder = run_dir / "eval"  # what was measured, and what the model said, kept in the run
    folder.mkdir(exist_ok=True)
    name = evaluation_name(cfg.eval.split, run_cfg, cfg, data_config)
    atomic_write_text(folder / f"{name}.json", json.dumps(metrics, indent=1) + "\n")
    if predictions:
        write_predictions(folder / f"{name}.predictions.jsonl", predictions)
    return metrics
