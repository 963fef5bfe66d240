"""Engines: run a strategy's rounds. ``embedded`` = in-process simulation on one shared base model."""

from fedlora.engine.checkpoint import latest_checkpoint, save_checkpoint
from fedlora.engine.embedded import EmbeddedEngine, Simulation, sample_clients

__all__ = ["EmbeddedEngine", "Simulation", "latest_checkpoint", "sample_clients", "save_checkpoint"]
