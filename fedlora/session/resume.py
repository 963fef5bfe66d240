"""Where a resume starts: the run's own config (checked against its recorded checksum) and the changes a
resume may make."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedlora.config import loader
from fedlora.config.loader import apply_overrides
from fedlora.config.schema import ExperimentConfig
from fedlora.engine.checkpoint import Checkpoint, CheckpointError, latest_checkpoint
from fedlora.engine.run_folder import (
    check_resume,
    known_config_sha256,
    read_run_info,
    verified_config_text,
)
from fedlora.errors import ConfigError
from fedlora.preflight import config_from_dict
from fedlora.tracking.metrics import MetricsLog


def resume_point(
    run_dir: Path, cfg: ExperimentConfig, metrics: MetricsLog
) -> tuple[Checkpoint | None, dict[str, Any]]:
    """Where a resume starts and the (safe) config changes it makes; ConfigError for anything that would
    not resume exactly: a damaged or edited config, damaged checkpoints, a change to what is trained."""
    stored = loader.config_from_dict(yaml.safe_load(verified_config_text(run_dir)))
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
        if recorded is not None and recorded not in known_config_sha256(read_run_info(run_dir)):
            raise ConfigError(f"{run_dir}/config.yaml is not the config its checkpoints were made with")
    changes = check_resume(stored, cfg, checkpoint.round if checkpoint else 0)
    return checkpoint, changes


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The run's own config (checked against its recorded checksum), with ``overrides`` applied."""
    tree = yaml.safe_load(verified_config_text(run_dir))
    if not isinstance(tree, dict):
        raise ConfigError(f"{run_dir}/config.yaml is damaged: its top level is not a mapping of sections")
    return config_from_dict(apply_overrides(tree, overrides or []))
