"""Evaluating a finished run's global adapter, on its own data or on another data config."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, TextIO

import yaml
from safetensors.torch import load_file

from fedlora.adapters.state import AdapterState
from fedlora.compute import autocast, model_device
from fedlora.config.loader import apply_overrides
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.checkpoint import latest_checkpoint
from fedlora.engine.evaluation import (
    evaluate_personal,
    evaluate_state,
    evaluate_state_load,
    write_predictions,
)
from fedlora.engine.run_folder import atomic_write_text, config_changes
from fedlora.engine.sampling import evaluation_clients
from fedlora.engine.setup import assemble_simulation
from fedlora.engine.transport import Simulation
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


def benchmark_state(
    run_dir: Path,
    sim: Simulation,
    state: AdapterState,
    names: list[str],
    limit: int | None = None,
    num_fewshot: int = 0,
    base: bool = False,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Score ``state`` (and, with ``base``, the untrained adapter) on the benchmarks ``names``
    (:mod:`fedlora.eval.benchmarks`) into ``run_dir/eval/tasks.json`` (per task: its source file, split,
    n, the adapter's and the base's acc / acc_norm with standard errors) and ``tasks.samples.jsonl`` (each
    item's choice log-likelihoods), and print the table to ``stream``."""
    from fedlora.eval.benchmarks import evaluate_benchmarks, paired_difference, task_source

    if sim.encoder.task != "causal-lm":
        raise ConfigError(
            "benchmark tasks score a language model's choices; this run's model.task is a classifier"
        )
    assert sim.adapters.model is not None
    batch = sim.plan.eval.batch_size
    models = [("adapter", state), *([("base", sim.adapters.initial_state())] if base else [])]
    scored: dict[str, dict[str, dict[str, Any]]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for which, weights in models:
        evaluate_state_load(sim, weights)
        with autocast(sim.plan.precision, model_device(sim.adapters.model)):
            scored[which], samples[which] = evaluate_benchmarks(
                sim.adapters.model,
                sim.encoder.tokenizer,
                names,
                limit,
                num_fewshot,
                batch,
                f"{which} ",
                stream,
            )
    tasks = {
        name: {
            **task_source(name),
            "n": scored["adapter"][name]["n"],
            "num_fewshot": num_fewshot,
            **{which: {k: v for k, v in scored[which][name].items() if k != "n"} for which in scored},
        }
        for name in scored["adapter"]
    }
    rows = []
    for i, sample in enumerate(samples["adapter"]):
        beside = samples["base"][i] if "base" in samples else {}
        rows.append({**sample, **{f"base_{k}": beside[k] for k in ("lls", "acc", "acc_norm") if k in beside}})
    if "base" in scored:  # the difference the adapter made, paired over the same items
        for name, task in tasks.items():
            metrics = [m for m in ("acc", "acc_norm") if m in task["adapter"]]
            task["adapter_minus_base"] = paired_difference([r for r in rows if r["task"] == name], metrics)
    folder = run_dir / "eval"
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / "tasks.json", json.dumps({"tasks": tasks}, indent=1) + "\n")
    write_predictions(folder / "tasks.samples.jsonl", rows)
    if stream is not None:
        stream.write(benchmark_table(tasks) + "\n")
    return tasks


def benchmark_table(tasks: dict[str, dict[str, Any]]) -> str:
    """The benchmarks as a plain table: task, n, metric, adapter, base and adapter minus base (paired over
    the items), each +- its standard error."""
    lines = [f"{'task':<16}{'n':>6}  {'metric':<9}{'adapter':>17}{'base':>17}{'adapter - base':>19}"]
    for name, task in tasks.items():
        for metric in ("acc", "acc_norm"):
            if metric not in task["adapter"]:
                continue
            cells = []
            for which in ("adapter", "base", "adapter_minus_base"):
                got = task.get(which)
                sign = "+" if which == "adapter_minus_base" else ""
                cells.append(
                    f"{got[metric]:{sign}.4f} +- {got[metric + '_stderr']:.4f}" if got is not None else "-"
                )
            lines.append(f"{name:<16}{task['n']:>6}  {metric:<9}{cells[0]:>17}{cells[1]:>17}{cells[2]:>19}")
    return "\n".join(lines)


def evaluate_run(
    run_dir: Path,
    overrides: list[str] | None = None,
    split: str | None = None,
    data_config: Path | None = None,
    base: bool = False,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Evaluate ``run_dir/global`` on the run's data config, or on another one, into
    ``run_dir/eval/<name>.json`` (:func:`evaluation_name`).

    ``data_config``: a YAML file whose data/partition/federation/eval sections replace the run's (the model,
    adapter and strategy stay the run's); then ``overrides`` (evaluation settings only:
    :func:`check_eval_overrides`); then ``split``. ``base``: the same metrics of the untrained adapter (the
    base model; with a classification head, its untrained head) too, as ``base_*`` keys, and its
    generations beside the adapter's in ``<name>.predictions.jsonl``. ``tasks``: score benchmarks instead
    (:func:`benchmark_state`; ``limit`` items each, ``num_fewshot`` examples) into ``eval/tasks.json``.
    Stages and progress go to ``stream`` (None: nothing is printed; the CLI passes stderr).
    """
    started = time.perf_counter()

    def stage(text: str) -> None:
        if stream is not None:
            stream.write(f"[{time.perf_counter() - started:6.1f}s] {text}\n")
            stream.flush()

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
    saved = None  # the global adapter, read before any work: a damaged file is one error line, not a late one
    if adapter_file.exists():
        try:
            saved = load_file(str(adapter_file))
        except Exception as err:  # safetensors raises its own error types for a damaged file
            raise ConfigError(
                f"{adapter_file} is damaged ({err}); re-export it with fedlora run --resume"
            ) from None
    stage(f"loading {run_cfg.model.name} and the data of {run_dir}")
    sim, _ = assemble_simulation(cfg, for_training=False)
    names = list(dict.fromkeys([*cfg.eval.metrics, *cfg.eval.final_metrics]))
    clients = evaluation_clients(cfg.eval, cfg.federation.seed, sim.federation, final=True)
    if sim.client_models is not None and tasks:
        raise ConfigError(
            f"{run_dir} is a personalised run (each client its own model): benchmark tasks score one global model"
        )
    if sim.client_models is not None:  # personalised: each client's newest weights with what is shared
        sim.client_models.folder = run_dir / "personal"
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is not None:  # the whole server state: a head, prototypes, each client's own adapter...
            sim.server.restore(checkpoint.tensors, checkpoint.meta)
            return evaluate_personal(sim, clients, names, before_round=checkpoint.round + 1)
        sim.server.load_global_adapter(sim.client_models.to_shared(saved or load_file(str(adapter_file))))
        return evaluate_personal(sim, clients, names, before_round=cfg.federation.rounds + 1)
    if saved is None:
        tuned = load_file(str(model_file))  # saved with plain names; the live model's carry ".base_layer"
        state = {n: tuned[n.replace(".base_layer", "")] for n, _ in sim.adapters.base_parameters()}
    else:
        state = saved
    if tasks:
        stage(f"scoring {', '.join(tasks)}{' (adapter and base)' if base else ''}")
        return benchmark_state(run_dir, sim, state, tasks, limit, num_fewshot, base, stream)
    predictions: list[dict[str, Any]] = []
    count = sum(len(c.split(cfg.eval.split)) for c in clients)
    stage(f"evaluating the adapter on {len(clients)} clients ({count} examples): {', '.join(names)}")
    metrics: dict[str, Any] = evaluate_state(sim, state, clients, names, predictions)
    if base:
        stage("evaluating the base model (the untrained adapter) on the same examples")
        base_predictions: list[dict[str, Any]] = []
        untrained = evaluate_state(sim, sim.adapters.initial_state(), clients, names, base_predictions)
        metrics.update({f"base_{k}": v for k, v in untrained.items()})
        predictions = [
            {
                **ours,
                **{
                    f"base_{k}": v
                    for k, v in theirs.items()
                    if k not in ("client", "instruction", "input", "reference")
                },
            }
            for ours, theirs in zip(predictions, base_predictions, strict=True)
        ]
    folder = run_dir / "eval"  # what was measured, and what the model said, kept in the run
    folder.mkdir(exist_ok=True)
    name = evaluation_name(cfg.eval.split, run_cfg, cfg, data_config)
    atomic_write_text(folder / f"{name}.json", json.dumps(metrics, indent=1) + "\n")
    if predictions:
        write_predictions(folder / f"{name}.predictions.jsonl", predictions)
    stage(f"wrote {folder / (name + '.json')}")
    return metrics
