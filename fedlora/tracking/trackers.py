"""Experiment trackers next to ``metrics.jsonl`` (``output.trackers: [tensorboard, wandb, mlflow]``; each one
an optional package, each one local unless the user points it elsewhere).

What every tracker receives: the run's whole config (once, when the run is created), each round's record as
it ends (every numeric field at step = round: ``train_loss``, ``learning_rate``, ``train_tokens_per_second``,
``eval_*``, ``bytes_up``, ...; the training loss every ``output.logging_steps`` optimizer steps on its own
axis: TensorBoard ``train/loss_step``, MLflow ``train_loss_step``, W&B a line chart at the end), and at the end
the last record's numbers as the run's summary plus ``curves.png`` and ``metrics.jsonl`` where the tracker
keeps files.

- ``tensorboard``: event files in ``RUN/tensorboard/`` (tensorboardX).
- ``wandb``: Weights & Biases, offline by default (``RUN/wandb/offline-run-*``; ``wandb sync`` uploads it
  later); ``WANDB_MODE=online`` logs live. The run id is kept in ``RUN/trackers.json``, so a ``--resume``
  continues the same W&B run (W&B ignores steps it has already seen: the replayed rounds keep their first
  values there, while ``metrics.jsonl`` holds the replayed ones).
- ``mlflow``: an MLflow run in a local file store ``RUN/mlruns`` (or ``MLFLOW_TRACKING_URI``), params = the
  config's dotted keys; a resume continues the same MLflow run.

A tracker of your own: ``@TRACKERS.register("name")`` on ``fn(cfg, run_dir) -> Tracker``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedlora.config.schema import ExperimentConfig
from fedlora.engine.run_folder import atomic_write_text
from fedlora.errors import ConfigError
from fedlora.registry import Registry, UnknownName


class Tracker(Protocol):
    """Receives a run's rounds as they end, then its summary."""

    def log_round(self, record: dict[str, Any]) -> None: ...

    def finish(self, records: list[dict[str, Any]], files: list[Path]) -> None: ...

    def close(self) -> None: ...


TrackerFactory = Callable[[ExperimentConfig, Path], Tracker]
TRACKERS: Registry[TrackerFactory] = Registry("tracker", "output.trackers")


def numbers(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a round record (no ``round``, no booleans, no NaN written as null)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def loss_steps(record: dict[str, Any]) -> list[tuple[int, float]]:
    """A round's training loss every ``output.logging_steps`` optimizer steps: ``(step, loss)`` pairs, the
    step counted over the run (:func:`fedlora.session.recording.logged_steps`)."""
    return [(int(step), float(loss)) for step, loss in record.get("loss_steps") or []]


def flat_config(cfg: ExperimentConfig) -> dict[str, str]:
    """The config as dotted keys -> JSON text of each leaf (``client.lr`` -> ``0.0003``)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            flat[prefix] = json.dumps(value)

    walk("", cfg.model_dump(mode="json"))
    return flat


def hparam_value(text: str) -> bool | int | float | str:
    """A :func:`flat_config` leaf as what TensorBoard's hyperparameters take: a number, a bool or text."""
    value = json.loads(text)
    return value if isinstance(value, (bool, int, float, str)) else text


def needs(package: str, tracker: str) -> Any:
    """Import ``package`` for ``tracker`` or fail with one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"config field 'output.trackers': {tracker} needs the {package} package "
            f"(pip install 'fedlora[{tracker}]'), or remove it from output.trackers"
        ) from None


class TrackerIds:
    """``RUN/trackers.json``: each tracker's own run id, so that a resume continues the same tracker run."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "trackers.json"

    def get(self, name: str) -> str | None:
        if not self.path.exists():
            return None
        return json.loads(self.path.read_text(encoding="utf-8")).get(name)

    def set(self, name: str, run_id: str) -> None:
        ids = json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        ids[name] = run_id
        atomic_write_text(self.path, json.dumps(ids, indent=2) + "\n")


@TRACKERS.register("tensorboard")
class TensorBoardTracker:
    """Every numeric field of a round's record as a TensorBoard scalar at step = round; the config as text
    (``config``, the YAML) and, when the run ends, as hyperparameters beside its final figures (HPARAMS tab)."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        from fedlora.config.loader import config_text

        writer = needs("tensorboardX", "tensorboard").SummaryWriter
        self.writer = writer(logdir=str(run_dir / "tensorboard"))
        self.hparams = {k: hparam_value(v) for k, v in flat_config(cfg).items()}
        self.writer.add_text("config", "```yaml\n" + config_text(cfg) + "```", 0)

    def log_round(self, record: dict[str, Any]) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, int(record["round"]))
        for step, loss in loss_steps(record):  # its own axis: optimizer steps
            self.writer.add_scalar("train/loss_step", loss, step)
        self.writer.flush()

    def finish(self, records: list[dict[str, Any]], files: list[Path]) -> None:
        final: dict[str, float] = {}
        for record in records:  # the last value of each figure
            final.update({f"final/{k}": v for k, v in numbers(record).items()})
        self.writer.add_hparams(self.hparams, final, name="hparams")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb")
class WandbTracker:
    """A Weights & Biases run (offline unless ``WANDB_MODE`` says otherwise) holding config, rounds, summary."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        wandb = needs("wandb", "wandb")
        os.environ.setdefault("WANDB_SILENT", "true")
        ids = TrackerIds(run_dir)
        run_id = ids.get("wandb") or uuid.uuid4().hex[:16]
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.output.tracking_project,
            name=cfg.name,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=cfg.model_dump(mode="json"),
        )
        ids.set("wandb", run_id)

    def log_round(self, record: dict[str, Any]) -> None:
        self.run.log(numbers(record), step=int(record["round"]))

    def finish(self, records: list[dict[str, Any]], files: list[Path]) -> None:
        if records:
            self.run.summary.update(numbers(records[-1]))
        points = [list(point) for record in records for point in loss_steps(record)]
        if points:  # W&B has one step axis (the round): the per-step loss as a line over optimizer steps
            table = self.wandb.Table(data=points, columns=["optimizer_step", "train_loss"])
            self.run.log({"train_loss_steps": self.wandb.plot.line(table, "optimizer_step", "train_loss")})
        for path in files:
            if path.suffix == ".png":
                self.run.log({path.stem: self.wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


@TRACKERS.register("mlflow")
class MlflowTracker:
    """An MLflow run (local file store ``RUN/mlruns`` unless ``MLFLOW_TRACKING_URI`` is set): the config as
    params, each round's numbers as metrics at step = round, the curves and metrics.jsonl as artifacts."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        needs("mlflow", "mlflow")
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store on request
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        ids = TrackerIds(run_dir)
        run_id = ids.get("mlflow")
        if run_id is None:
            project = cfg.output.tracking_project
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
            run_id = self.client.create_run(experiment_id, run_name=cfg.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in flat_config(cfg).items()]  # MLflow's value limit
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(run_id, params=params[start : start + 100])
            ids.set("mlflow", run_id)
        self.run_id = run_id

    def log_round(self, record: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(record["round"])
        metrics = [Metric(k, v, now, step) for k, v in numbers(record).items()]
        metrics += [Metric("train_loss_step", loss, now, s) for s, loss in loss_steps(record)]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, records: list[dict[str, Any]], files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id)

    def close(self) -> None:
        pass


def open_trackers(cfg: ExperimentConfig, run_dir: Path) -> list[Tracker]:
    """The trackers named in ``output.trackers`` (plus ``tensorboard`` for ``output.tensorboard: true``)."""
    names = list(dict.fromkeys([*cfg.output.trackers, *(["tensorboard"] if cfg.output.tensorboard else [])]))
    try:
        factories = [TRACKERS.get(name) for name in names]
    except UnknownName as err:
        raise ConfigError(str(err)) from None
    return [factory(cfg, run_dir) for factory in factories]
