"""Strategies by name: ``@register_strategy`` on the class, a Python entry point in the group
``fedlora.strategies``, or a module listed under a config's ``plugins:``.

Built-ins are the modules of this package, found by listing it: adding a method is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import ValidationError

from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig, StrategyConfig
from fedlora.registry import Registry, UnknownName, import_plugins
from fedlora.strategies.base import Strategy

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name", builtins=("fedlora.strategies",))


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a :class:`Strategy` subclass known under ``cls.name``."""
    STRATEGIES.register(cls.name, cls)
    return cls


def import_builtin_methods() -> None:
    """Import every module of ``fedlora.strategies`` (each registers its method and client hooks)."""
    import fedlora.strategies as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES.get(name)
    except UnknownName as err:
        raise ConfigError(str(err)) from None


def validate_strategy_config(cfg: StrategyConfig) -> None:
    """Fail early, naming the field, if the strategy or one of its options is wrong."""
    cls = strategy_class(cfg.name)
    try:
        cls.Options.model_validate(cfg.options)
    except ValidationError as err:
        problems = []
        for problem in err.errors():
            key = ".".join(str(p) for p in problem["loc"])
            msg = "unknown option" if problem["type"] == "extra_forbidden" else problem["msg"]
            known = ", ".join(cls.Options.model_fields) or "none"
            problems.append(
                f"config field 'strategy.options.{key}': {msg} (got {problem.get('input')!r}; options of {cfg.name}: {known})"
            )
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def check_experiment(cfg: ExperimentConfig) -> None:
    """The strategy and its options are valid, and the method can honour the whole experiment (e.g. it
    refuses privacy it cannot account for); raises ConfigError naming the field otherwise."""
    try:
        import_plugins(cfg.plugins)
    except UnknownName as err:
        raise ConfigError(str(err)) from None
    validate_strategy_config(cfg.strategy)
    cls = strategy_class(cfg.strategy.name)
    reason = cls.refusal(cfg, cls.Options.model_validate(cfg.strategy.options))
    if reason is not None:
        raise ConfigError(reason)


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy (callers run :func:`check_experiment` first, before loading anything)."""
    cls = strategy_class(cfg.strategy.name)
    return cls(cls.Options.model_validate(cfg.strategy.options))
