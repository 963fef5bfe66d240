"""Where a resume starts: the run's own config (checked against its recorded checksum) and the changes a
resume may make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedlora.config.loader import apply_overrides
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from fedlora.engine.run_folder import (
    check_resume,
    known_config_sha256,
    read_run_info,
    verified_config_text,
)
from fedlora.engine.server import state_from_checkpoint
from fedlora.errors import ConfigError
from fedlora.preflight import config_from_dict
from fedlora.tracking.metrics import MetricsLog


def resume_point(
    run_dir: Path, cfg: ExperimentConfig, metrics: MetricsLog
) -> tuple[Checkpoint | None, dict[str, Any]]:
    """Where a resume starts and the (safe) config changes it makes; ConfigError for anything that would
    not resume exactly: a damaged or edited config, damaged checkpoints, a change to what is trained."""
    # a run recorded before the strategy's defaults were written into its config compares as it ran
    stored = config_from_dict(yaml.safe_load(verified_config_text(run_dir)))
    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints", must_exist=True)
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    check_metrics_agree(run_dir, checkpoint.round if checkpoint else 0, metrics)
    if checkpoint is not None:
        try:  # the server state in this version's format, before any model loads
            state_from_checkpoint(checkpoint.tensors, checkpoint.meta)
        except CheckpointError as err:
            raise ConfigError(f"{run_dir}: {err}") from None
        recorded = checkpoint.meta.get("config_sha256")
        if recorded is not None and recorded not in known_config_sha256(read_run_info(run_dir)):
            raise ConfigError(f"{run_dir}/config.yaml is not the config its checkpoints were made with")
    changes = check_resume(stored, cfg, checkpoint.round if checkpoint else 0)
    return checkpoint, changes


def check_metrics_agree(run_dir: Path, done: int, metrics: MetricsLog) -> None:
    """The rounds ``metrics.jsonl`` logged must agree with the checkpoint a resume starts after (round
    ``done``, 0 for none): every round 1..done logged once, and at most one more (the round that was being
    checkpointed when the process stopped; the resume does it again). Anything else (a gap, a round logged
    with no checkpoint behind it and no checkpoint before it) would resume into a mislabelled record."""
    logged = sorted(r.get("round", 0) for r in metrics.read())
    expected = list(range(1, done + 1))
    kept = [n for n in logged if n <= done]
    if kept != expected:
        missing = sorted(set(expected) - set(kept))
        what = f"rounds {missing[:5]} missing" if missing else "rounds logged twice"
        raise ConfigError(
            f"{run_dir}/metrics.jsonl does not agree with the checkpoint after round {done} ({what}): the run "
            "cannot resume exactly; start a new run"
        )
    beyond = [n for n in logged if n > done + 1]
    if beyond:
        raise ConfigError(
            f"{run_dir} logged rounds up to {beyond[-1]} but its newest usable checkpoint is after round {done}: "
            "the checkpoints in between are missing or damaged; the run cannot resume exactly; start a new run"
        )


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The run's own config (checked against its recorded checksum), with ``overrides`` applied."""
    tree = yaml.safe_load(verified_config_text(run_dir))
    if not isinstance(tree, dict):
        raise ConfigError(f"{run_dir}/config.yaml is damaged: its top level is not a mapping of sections")
    return config_from_dict(apply_overrides(tree, overrides or []))
