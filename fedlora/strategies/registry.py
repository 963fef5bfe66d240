"""Strategies by name: ``@register_strategy`` on the class, a Python entry point in the group
``fedlora.strategies``, or a module listed under a config's ``plugins:``.

Built-ins register when their module is imported; importing the package ``fedlora.strategies`` (which any
``from fedlora.strategies.<x> import ...`` does first) imports every module in it, so adding a method is
adding its module. The experiment-wide checks are :func:`fedlora.preflight.check_experiment`.
"""

from __future__ import annotations

from pydantic import ValidationError

from fedlora.config.schema import StrategyConfig
from fedlora.errors import ConfigError
from fedlora.registry import Registry, UnknownName
from fedlora.strategies.base import Strategy, StrategyOptions

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "strategy.name")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a :class:`Strategy` subclass known under ``cls.name``."""
    STRATEGIES.register(cls.name, cls)
    return cls


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES.get(name)
    except UnknownName as err:
        raise ConfigError(str(err)) from None


def validate_strategy_options(cfg: StrategyConfig) -> StrategyOptions:
    """The strategy's typed options; raises :class:`ConfigError` naming the field if the strategy or one of
    its options is wrong."""
    cls = strategy_class(cfg.name)
    try:
        return cls.Options.model_validate(cfg.options)
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


def build_strategy(cfg: StrategyConfig) -> Strategy:
    """The configured strategy (callers preflight the experiment first, before loading anything)."""
    return strategy_class(cfg.name)(validate_strategy_options(cfg))
