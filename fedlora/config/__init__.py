"""Experiment configuration: schema (pydantic) and loading (YAML + dotted overrides)."""

from fedlora.config.loader import builtin_config_path, dump_config, read_config
from fedlora.config.schema import ExperimentConfig
from fedlora.errors import ConfigError

__all__ = ["ConfigError", "ExperimentConfig", "builtin_config_path", "dump_config", "read_config"]
