"""Engines: run a strategy's rounds. ``embedded`` = in-process simulation on one shared base model."""

from fedlora.engine.checkpoint import latest_checkpoint, save_checkpoint
from fedlora.engine.embedded import EmbeddedEngine
from fedlora.engine.sampling import sample_clients
from fedlora.engine.transport import Simulation

__all__ = ["EmbeddedEngine", "Simulation", "latest_checkpoint", "sample_clients", "save_checkpoint"]
