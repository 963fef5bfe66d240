"""Client side: the generic local trainer, the hook objects methods plug into it, personal state on disk."""

from fedlora.client.hooks import ClientContext, ClientHooks, register_client_hooks
from fedlora.client.settings import DPSettings, LocalTrainingSettings
from fedlora.client.steps import LocalResult, round_seed
from fedlora.client.store import PersonalStore
from fedlora.client.trainer import train_locally

__all__ = [
    "ClientContext",
    "ClientHooks",
    "DPSettings",
    "LocalResult",
    "LocalTrainingSettings",
    "PersonalStore",
    "register_client_hooks",
    "round_seed",
    "train_locally",
]
