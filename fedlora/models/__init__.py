"""Base models: built-in registry, GGUF conversion, the tiny test model, and loading."""

from fedlora.models.loading import ModelBundle, load_base_model, resolve_model_folder
from fedlora.models.registry import BUILTIN_NAMES, cache_root, fetch_builtin

__all__ = [
    "BUILTIN_NAMES",
    "ModelBundle",
    "cache_root",
    "fetch_builtin",
    "load_base_model",
    "resolve_model_folder",
]
