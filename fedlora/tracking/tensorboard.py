"""Optional TensorBoard event files beside metrics.jsonl (``output.tensorboard: true``; needs tensorboardX,
``pip install fedlora[tensorboard]``): every numeric field of a round's record as a scalar at step = round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.config.loader import ConfigError


class TensorBoardLog:
    """Writes each round record's numbers (``train_loss``, ``eval_*``, ``bytes_up``, ...) as scalars."""

    def __init__(self, folder: Path) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(
                "config field 'output.tensorboard': needs the tensorboardX package (pip install 'fedlora[tensorboard]')"
            ) from None
        self.folder = folder
        self.writer = SummaryWriter(logdir=str(folder))

    def append(self, record: dict[str, Any]) -> None:
        step = int(record["round"])
        for key, value in record.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
