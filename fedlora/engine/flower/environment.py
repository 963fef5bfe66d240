"""The environment of every Flower process fedlora starts: no update checks, no telemetry, Flower's logs kept
quiet unless asked for."""

from __future__ import annotations

import logging
import os

# What fedlora sets in every Flower process it starts: no runtime dependency installation, no update
# check, no telemetry, and Ray's notice about GPU visibility (num_gpus=0 actors) off.
FLOWER_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


def flower_log_level() -> str:
    """Flower's and Ray's log level: ``FEDLORA_FLOWER_LOG`` (default WARNING)."""
    return os.environ.get("FEDLORA_FLOWER_LOG", "WARNING").upper()


def quiet_flower() -> None:
    """Flower's environment settings, and its own logger at WARNING (its per-message INFO/DEBUG lines
    flood a simulation's console; ``FEDLORA_FLOWER_LOG=INFO`` or ``DEBUG`` brings them back)."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(flower_log_level())
    flwr_log.propagate = False  # it has its own console handler: not twice through the root logger
