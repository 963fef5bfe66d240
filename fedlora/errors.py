"""The errors fedlora raises (bad input, a stopped or failed run): a leaf module (imports nothing of fedlora), so every layer can
raise them without importing the layer that defines the config."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be run; the message says which field, what was given and what is allowed."""


class DataError(ValueError):
    """Bad input data; the message names the file and, where it applies, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class RunInterrupted(Exception):
    """A stop was asked for (SIGINT / SIGTERM): the current round was abandoned, the last checkpoint stands."""

    def __init__(self, signum: int, last_round: int) -> None:
        super().__init__(f"interrupted by signal {signum} after round {last_round}")
        self.signum = signum
        self.last_round = last_round


class RunFailed(RuntimeError):
    """The run cannot make progress (``federation.max_skipped_rounds`` rounds in a row were skipped)."""
