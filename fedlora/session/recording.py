"""What a run does with each finished round (its record to ``metrics.jsonl``, the trackers, the progress bar,
periodic and best adapters, early stopping) and the line it starts with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.config.schema import ExperimentConfig
from fedlora.engine.early_stopping import EarlyStopping
from fedlora.engine.transport import Simulation
from fedlora.models.loading import ModelBundle
from fedlora.session.export import export_adapter
from fedlora.session.run_info import rank_summary, scaling_summary
from fedlora.tracking.metrics import MetricsLog
from fedlora.tracking.report import RoundProgress
from fedlora.tracking.trackers import Tracker


def run_headline(cfg: ExperimentConfig, sim: Simulation, per_round: int) -> str:
    """The one line a run starts with: method, data, clients, rounds, model(s), adapter ranks and scaling, the
    precision it trains at."""
    models = (
        f"models {' / '.join(sim.client_models.labels)}" if sim.client_models else f"model {cfg.model.name}"
    )
    return (
        f"[bold]{cfg.name}[/]: {cfg.strategy.name} on {sim.federation.description}; "
        f"{len(sim.federation.clients)} clients, {per_round} per round, {cfg.federation.rounds} rounds; "
        f"{models}, {'rsLoRA' if cfg.adapter.use_rslora else 'LoRA'} {rank_summary(sim)} {scaling_summary(sim)}; "
        f"precision {sim.plan.precision}"
    )


def logged_steps(record: dict[str, Any], before: list[dict[str, Any]], every: int) -> dict[str, Any]:
    """``record`` with its ``step_losses`` (one per local optimizer step) as ``loss_steps``: ``[step, loss]``
    every ``every`` steps, the mean of the window's losses, ``step`` counted over the whole run (the rounds
    before add their ``optimizer_steps``), the HF Trainer's ``logging_steps`` on the federated axis."""
    losses = record.get("step_losses")
    if not losses:
        return record
    out = {k: v for k, v in record.items() if k != "step_losses"}
    offset = sum(int(r.get("optimizer_steps", 0)) for r in before)
    windows = [losses[i : i + every] for i in range(0, len(losses), every)]
    out["optimizer_steps"] = len(losses)
    out["loss_steps"] = [
        [offset + min((i + 1) * every, len(losses)), sum(w) / len(w)] for i, w in enumerate(windows)
    ]
    return out


class RoundRecorder:
    """What happens to each finished round's record: ``metrics.jsonl``, the trackers, the progress bar, the
    ``output.save_every`` adapters and, with early stopping, ``best/`` and whether to go on."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        sim: Simulation,
        bundle: ModelBundle,
        run_dir: Path,
        metrics: MetricsLog,
        trackers: list[Tracker],
        records: list[dict[str, Any]],
        progress: RoundProgress,
    ) -> None:
        self.cfg, self.sim, self.bundle, self.run_dir = cfg, sim, bundle, run_dir
        self.metrics, self.trackers, self.records, self.progress = metrics, trackers, records, progress
        ev = cfg.eval
        self.early = (
            EarlyStopping.from_records(ev.early_stopping_metric, ev.early_stopping_patience, records)
            if ev.early_stopping_patience
            else None
        )

    def export(self, folder: Path) -> None:
        export_adapter(folder, self.cfg, self.sim, self.bundle, self.records)

    def on_round(self, record: dict[str, Any]) -> bool:
        """Record ``record``; False when early stopping ends the run after it."""
        record = logged_steps(record, self.records, self.cfg.output.logging_steps)
        self.metrics.append(record)
        for tracker in self.trackers:
            tracker.log_round(record)
        self.records.append(record)
        self.progress.advance(record)
        save_every = self.cfg.output.save_every
        if save_every and record["round"] % save_every == 0:
            self.export(self.run_dir / "adapters" / f"round_{record['round']}")
        if self.early is None:
            return True
        if self.early.update(record):  # the best round so far: its adapter is kept as best/
            self.export(self.run_dir / "best")
        return not self.early.should_stop
