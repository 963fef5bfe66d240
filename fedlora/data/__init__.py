"""Client data: sources, partitioning, per-client splits, and prompt encoding."""

from fedlora.data.errors import DataError
from fedlora.data.examples import ClientData, Example, Federation
from fedlora.data.federation import build_federation

__all__ = ["ClientData", "DataError", "Example", "Federation", "build_federation"]
