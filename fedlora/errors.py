"""The errors fedlora raises for bad input: a leaf module (imports nothing of fedlora), so every layer can
raise them without importing the layer that defines the config."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot be run; the message says which field, what was given and what is allowed."""
