"""Client-side local training."""

from fedlora.client.trainer import (
    LocalResult,
    LocalTrainingSettings,
    proximal_term,
    round_seed,
    train_locally,
)

__all__ = ["LocalResult", "LocalTrainingSettings", "proximal_term", "round_seed", "train_locally"]
