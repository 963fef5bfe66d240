"""Wiring: config -> data, model, adapters, strategy -> engine -> run directory.

Run directory layout::

    config.yaml            full resolved config
    clients.json           every client's name and split sizes
    run.json               base model folder, task, label names, fedlora version
    metrics.jsonl          one JSON object per round
    checkpoints/round_N/   server state to resume from (newest few)
    global/                final global adapter, a standard PEFT adapter folder
    curves.png             loss per round
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from fedlora import __version__
from fedlora.compute import describe_machine, model_device
from fedlora.config.loader import ConfigError, apply_overrides, config_from_dict, config_text
from fedlora.config.schema import ExperimentConfig
from fedlora.data.examples import Federation
from fedlora.data.federation import build_federation, rows_source
from fedlora.engine.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from fedlora.engine.early_stopping import EarlyStopping
from fedlora.engine.embedded import (
    EmbeddedEngine,
    RunInterrupted,
    Simulation,
    StopFlag,
    Transport,
    clients_per_round,
    evaluate_personal,
    evaluate_state,
    evaluation_clients,
    write_predictions,
)
from fedlora.engine.run_folder import (
    atomic_write_text,
    check_resume,
    read_run_info,
    replace_folder,
    run_lock,
    sha256_bytes,
    verified_config_text,
)
from fedlora.engine.setup import build_client_node, build_simulation
from fedlora.engine.workers import PaddedTokenCost, WorkerPoolTransport, parallel_workers, worker_devices
from fedlora.models.loading import ModelBundle, load_base_model
from fedlora.tracking.metrics import MetricsLog
from fedlora.tracking.report import RoundProgress, plot_curves, summary_table
from fedlora.tracking.trackers import open_trackers

log = logging.getLogger(__name__)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.output.root) / f"{stamp}-{cfg.name}"


@dataclass
class RunResult:
    """What a run produced, without reading its files: the run directory, one record per round (as in
    ``metrics.jsonl``), the final global state (the adapter, or the whole model for full-parameter methods)
    and the last round's figures."""

    run_dir: Path
    records: list[dict[str, Any]]
    final_state: dict[str, torch.Tensor]

    @property
    def metrics(self) -> dict[str, Any]:
        """The last round's record without its per-client details."""
        last = self.records[-1] if self.records else {}
        return {k: v for k, v in last.items() if k not in ("clients", "rejected", "faults")}


TransportFactory = Callable[[Simulation, Callable[[str], None]], Transport]


def run_experiment(cfg: ExperimentConfig, run_dir: Path | None = None, **options: Any) -> Path:
    """:func:`run`, returning only the run directory (``options``: those of :func:`run`)."""
    return run(cfg, run_dir, **options).run_dir


def run(
    cfg: ExperimentConfig,
    run_dir: Path | None = None,
    resume: bool = False,
    console: Console | None = None,
    show_progress: bool = True,
    transport_factory: TransportFactory | None = None,
    federation: Federation | None = None,
    dataset: Iterable[dict[str, Any]] | None = None,
) -> RunResult:
    """Run (or resume) an experiment into ``run_dir``.

    ``federation``: the clients' data given directly (a :class:`~fedlora.data.examples.Federation`) instead of
    the config's ``data`` section; ``dataset``: rows (a ``datasets.Dataset``, a list of dicts) read with the
    config's field names and partitioned by its ``partition`` section. ``engine: flower-sim`` hands the run to Flower's simulation runtime, whose
    ServerApp runs these same rounds with the clients behind Flower messages (``transport_factory``).
    """
    if dataset is not None:
        if federation is not None:
            raise ConfigError("give federation or dataset, not both")
        federation = build_federation(cfg, rows_source(cfg, dataset))
    if cfg.engine == "flower-sim" and transport_factory is None:
        target = Path(run_dir or cfg.output.dir or default_run_dir(cfg))
        if not resume and (target / "metrics.jsonl").exists():
            raise ConfigError(f"{target} already holds a run; use --resume {target} or another --output")
        from fedlora.engine.flower import run_flower_simulation

        run_flower_simulation(cfg, target, flower_server_app(cfg, target, resume), flower_client_app(cfg))
        records = MetricsLog(target / "metrics.jsonl").read()
        adapter = target / "global" / "adapter_model.safetensors"
        state = load_file(str(adapter if adapter.exists() else target / "global" / "model.safetensors"))
        return RunResult(target, records, state)
    if console is None:
        console = Console(stderr=True)
        if not console.is_terminal:
            console = Console(stderr=True, width=140)
    run_dir = Path(run_dir or cfg.output.dir or default_run_dir(cfg))
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    if not resume and metrics.path.exists():
        raise ConfigError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
    if resume and not (run_dir / "config.yaml").exists():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml): nothing to resume")
    with contextlib.ExitStack() as stack:
        if resume:  # check everything about the folder before loading any model
            stack.enter_context(run_lock(run_dir))
            checkpoint, changes = resume_point(run_dir, cfg, metrics)
        # data and model errors surface before the run directory is made
        sim, bundle = build_simulation(cfg, federation=federation)
        if not resume:
            stack.enter_context(run_lock(run_dir))
            if metrics.path.exists():
                raise ConfigError(
                    f"{run_dir} already holds a run; use --resume {run_dir} or another --output"
                )
            checkpoint, changes = None, {}
            atomic_write_text(run_dir / "config.yaml", config_text(cfg))
        start_round = checkpoint.round + 1 if checkpoint else 1
        records = metrics.truncate_after(start_round - 1) if resume else []
        if checkpoint:
            sim.strategy.load_server_state(checkpoint.tensors)
            sim.strategy.load_server_meta(checkpoint.meta)
            console.print(f"resuming {run_dir} after round {checkpoint.round}")
        write_run_info(run_dir, sim, bundle, changes, start_round)

        trackers = open_trackers(cfg, run_dir)
        for tracker in trackers:
            stack.callback(tracker.close)
        progress = RoundProgress(cfg.federation.rounds, start_round - 1, console, enabled=show_progress)
        stop = StopFlag()
        if transport_factory is not None:
            transport = transport_factory(sim, progress.status)
        else:
            transport = local_transport(sim, run_dir, progress.status, stop, console)
            if isinstance(transport, WorkerPoolTransport):
                stack.callback(transport.close)
                transport.start()  # each worker loads its model now, not inside round 1's time
        engine = EmbeddedEngine(sim, run_dir, status=progress.status, transport=transport, stop=stop)
        engine.meta_extra["config_sha256"] = sha256_bytes((run_dir / "config.yaml").read_bytes())
        models = (
            f"models {' / '.join(sim.client_models.labels)}"
            if sim.client_models
            else f"model {cfg.model.name}"
        )
        console.print(
            f"[bold]{cfg.name}[/]: {cfg.strategy.name} on {sim.federation.description}; "
            f"{len(sim.federation.clients)} clients, {engine.per_round} per round, {cfg.federation.rounds} rounds; "
            f"{models}, {'rsLoRA' if cfg.adapter.use_rslora else 'LoRA'} {rank_summary(sim)} alpha={cfg.adapter.alpha}"
        )
        ev = cfg.eval
        early = (
            EarlyStopping.from_records(ev.early_stopping_metric, ev.early_stopping_patience, records)
            if ev.early_stopping_patience
            else None
        )
        with progress, stop_on_signals(stop, console):

            def on_round(record: dict[str, Any]) -> bool:
                metrics.append(record)
                for tracker in trackers:
                    tracker.log_round(record)
                records.append(record)
                progress.advance(record)
                save_every = cfg.output.save_every
                if save_every and record["round"] % save_every == 0:
                    export_adapter(run_dir / "adapters" / f"round_{record['round']}", sim, bundle)
                if early is None:
                    return True
                if early.update(record):  # the best round so far: its adapter is kept as best/
                    export_adapter(run_dir / "best", sim, bundle)
                return not early.should_stop

            try:
                if early is not None and early.should_stop:  # a resumed run that had already stopped
                    console.print(f"early stopping: no improvement since round {early.best_round}")
                else:
                    engine.run(start_round, on_round)
            except RunInterrupted as stopped:
                console.print(
                    f"stopped by signal {stopped.signum}: rounds 1..{stopped.last_round} are complete and "
                    f"checkpointed. Resume with: fedlora run --resume {run_dir}"
                )
                raise
        final_state = finalize(run_dir, sim, bundle, records, console)
        files = [p for p in (run_dir / "curves.png", metrics.path) if p.exists()]
        for tracker in trackers:
            tracker.finish(records, files)
    return RunResult(run_dir, records, final_state)


def local_transport(
    sim: Simulation, run_dir: Path, status: Callable[[str], None], stop: StopFlag, console: Console
) -> Transport | None:
    """How this process reaches its clients (``compute``): worker processes, or None (in this process)."""
    cfg = sim.cfg
    assert sim.adapters.model is not None
    size = sum(p.numel() for p in sim.adapters.model.parameters())
    per_round = clients_per_round(cfg, len(sim.federation.clients))
    workers = parallel_workers(cfg, size, per_round)
    if cfg.compute.batch_clients and workers > 1:
        console.print(
            "compute.batch_clients: the round's clients train together in this process (no workers)"
        )
        return None
    if workers <= 1:
        return None
    devices = worker_devices(cfg, workers)
    console.print(
        f"{len(devices)} worker processes ({', '.join(devices)}), {cfg.client.num_threads} thread(s) each"
    )
    cost = PaddedTokenCost(cfg, sim.federation, sim.encoder)
    return WorkerPoolTransport(cfg, devices, run_dir / "personal", status, stop, cost)


def resume_point(
    run_dir: Path, cfg: ExperimentConfig, metrics: MetricsLog
) -> tuple[Checkpoint | None, dict[str, Any]]:
    """Where a resume starts and the (safe) config changes it makes; ConfigError for anything that would
    not resume exactly: a damaged or edited config, damaged checkpoints, a change to what is trained."""
    stored = config_from_dict(yaml.safe_load(verified_config_text(run_dir)))
    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints", must_exist=True)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    if checkpoint is None and metrics.read():
        raise ConfigError(
            f"{run_dir} has logged rounds but no checkpoint: the run cannot resume exactly; start a new run"
        )
    if checkpoint is not None:
        recorded = checkpoint.meta.get("config_sha256")
        if recorded is not None and recorded != sha256_bytes((run_dir / "config.yaml").read_bytes()):
            raise ConfigError(f"{run_dir}/config.yaml is not the config its checkpoints were made with")
    changes = check_resume(stored, cfg, checkpoint.round if checkpoint else 0)
    return checkpoint, changes


@contextlib.contextmanager
def stop_on_signals(stop: StopFlag, console: Console) -> Iterator[None]:
    """The first SIGINT / SIGTERM asks the engine to stop cleanly (the current round is abandoned, the last
    checkpoint stands); a second one ends the process at once. Only in the main thread (Flower's simulation
    runs the server in another)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop:
            os._exit(128 + signum)
        stop.signum = signum
        console.print(f"signal {signum}: stopping after the current client (again to stop at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def flower_server_app(
    config: ExperimentConfig | None = None, run_dir: Path | None = None, resume: bool = False
):
    """A Flower ServerApp running fedlora's rounds (config given, or from the Flower run config)."""
    from fedlora.engine.flower import server_app

    def start(cfg: ExperimentConfig, folder: Path, resume: bool, factory: TransportFactory) -> None:
        run_experiment(cfg, folder, resume=resume, show_progress=False, transport_factory=factory)

    return server_app(start, config, run_dir, resume)


def flower_client_app(config: ExperimentConfig | None = None):
    """A Flower ClientApp whose nodes keep their model and data across messages."""
    from fedlora.engine.flower import client_app

    return client_app(build_client_node, config)


def rank_summary(sim: Simulation) -> str:
    """``r8`` (one profile) or ``ranks a30-m200 x3, r8 x12`` (clients per rank profile)."""
    counts = Counter(p.name for p in sim.strategy.client_profiles.values())
    if len(counts) == 1:
        return next(iter(counts))
    return "ranks " + ", ".join(f"{name} x{n}" for name, n in sorted(counts.items()))


def write_run_info(
    run_dir: Path, sim: Simulation, bundle: ModelBundle, changes: dict[str, Any], start_round: int
) -> None:
    """``clients.json`` (each client's name and split sizes) and ``run.json`` (what export needs, the
    config's checksum, and the changes each resume made), both written atomically."""
    clients = [
        {
            "client": c.client_id,
            "name": c.name,
            "train": c.size("train"),
            "eval": c.size("eval"),
            "test": c.size("test"),
            "rank": sim.strategy.client_profiles[c.client_id].name,
            **(
                {"model": sim.client_models.labels[sim.client_models.variant_of[c.client_id]]}
                if sim.client_models is not None
                else {}
            ),
        }
        for c in sim.federation.clients
    ] + [
        {
            "client": c.client_id,
            "name": c.name,
            "test": c.size("test"),
            "eval": c.size("eval"),
            "held_out": True,
        }
        for c in sim.federation.held_out
    ]
    atomic_write_text(run_dir / "clients.json", json.dumps(clients, indent=0))
    info = {
        "fedlora_version": __version__,
        "base_model": str(bundle.folder.resolve()),
        "task": bundle.task,
        "label_names": sim.federation.label_names,
        "data": sim.federation.description,
        "dropped_empty_clients": sim.federation.dropped_empty,
    }
    previous = read_run_info(run_dir)
    info["config_sha256"] = previous.get("config_sha256") or sha256_bytes(
        (run_dir / "config.yaml").read_bytes()
    )
    info["resumes"] = previous.get("resumes", [])
    if changes:
        info["resumes"].append({"from_round": start_round, "changes": changes})
    # the machine of every start and resume: a run resumed elsewhere measured its rounds' seconds on several
    info["machines"] = [
        *(m for m in previous.get("machines", []) if m.get("from_round", 0) < start_round),
        {"from_round": start_round, **describe_machine(model_device(bundle.model))},
    ]
    atomic_write_text(run_dir / "run.json", json.dumps(info, indent=1))


def export_adapter(folder: Path, sim: Simulation, bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """The strategy's current evaluation adapter as a plain PEFT folder (full-parameter runs: a whole model
    folder) at ``folder``, built aside and then renamed (never half written); returns what was exported."""
    state = sim.strategy.evaluation_state()
    if sim.client_models is not None:  # exported for the first architecture (each client's model: personal/)
        state = sim.client_models.to_variant(state, 0)
        state = {k: v for k, v in state.items() if ".lora_" in k}  # the adapter, not local weights
    folder.parent.mkdir(parents=True, exist_ok=True)
    building = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(building, ignore_errors=True)
    if sim.adapters.is_full_state(state):
        sim.adapters.export_full(state, building, str(bundle.folder.resolve()))
    else:
        sim.adapters.export(state, building, str(bundle.folder.resolve()))
    replace_folder(building, folder)
    return state


def finalize(
    run_dir: Path, sim: Simulation, bundle: ModelBundle, records: list[dict[str, Any]], console: Console
) -> dict[str, torch.Tensor]:
    """Export the global adapter as a PEFT folder (full-parameter runs: a whole model folder), plot the
    curves, print the summary."""
    final_state = export_adapter(run_dir / "global", sim, bundle)
    if sim.cfg.output.plot:
        plot_curves(records, run_dir / "curves.png", f"{sim.cfg.name} ({sim.cfg.strategy.name})")
    console.print(summary_table(records, f"{sim.cfg.name}: {sim.cfg.strategy.name}, {len(records)} rounds"))
    for line in sim.strategy.report():
        console.print(line)
    up = sum(r.get("bytes_up", 0) for r in records)
    down = sum(r.get("bytes_down", 0) for r in records)
    console.print(
        f"total bytes up {up:,}  down {down:,}; run directory: [bold]{run_dir}[/] (global adapter in global/)"
    )
    return final_state


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The run's own config (checked against its recorded checksum), with ``overrides`` applied."""
    tree = yaml.safe_load(verified_config_text(run_dir))
    if not isinstance(tree, dict):
        raise ConfigError(f"{run_dir}/config.yaml is damaged: its top level is not a mapping of sections")
    return config_from_dict(apply_overrides(tree, overrides or []))


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
    clients = evaluation_clients(cfg, sim.federation, final=True)
    if sim.client_models is not None:  # personalised: each client's newest weights with what is shared
        sim.client_models.folder = run_dir / "personal"
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is not None:  # the whole server state: a head, prototypes, each client's own adapter...
            sim.strategy.load_server_state(checkpoint.tensors)
            sim.strategy.load_server_meta(checkpoint.meta)
            return evaluate_personal(sim, clients, names, before_round=checkpoint.round + 1)
        sim.strategy.load_server_state(load_file(str(adapter_file)))
        sim.strategy.global_state = sim.client_models.to_shared(sim.strategy.global_state)
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


def export_merged(run_dir: Path, out: Path) -> Path:
    """Load the base model with plain PEFT, merge the global adapter into it, save full weights to ``out``."""
    from peft import PeftModel

    cfg = load_run_config(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    bundle = load_base_model(
        cfg.model,
        num_labels=len(info["label_names"]) if info["label_names"] else None,
        head_seed=cfg.adapter.init_seed,
    )
    merged = PeftModel.from_pretrained(bundle.model, str(run_dir / "global")).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    bundle.tokenizer.save_pretrained(str(out))
    return out


__all__ = [
    "RunResult",
    "build_simulation",
    "evaluate_run",
    "export_merged",
    "flower_client_app",
    "flower_server_app",
    "load_run_config",
    "run",
    "run_experiment",
]
