"""Name -> strategy class. Adding a method: one new module and one line here."""

from __future__ import annotations

from pydantic import ValidationError

from fedlora.config.loader import ConfigError
from fedlora.config.schema import ExperimentConfig, StrategyConfig
from fedlora.strategies.base import Strategy
from fedlora.strategies.fedavg import FedAvg, FedIT, FedProx
from fedlora.strategies.fedmezo import FedMeZO
from fedlora.strategies.ffa_lora import FFALoRA
from fedlora.strategies.flexlora import FlexLoRA
from fedlora.strategies.hetlora import HetLoRA
from fedlora.strategies.pfedlora import PFedLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    FedIT.name: FedIT,
    FedAvg.name: FedAvg,
    FedProx.name: FedProx,
    FlexLoRA.name: FlexLoRA,
    HetLoRA.name: HetLoRA,
    FFALoRA.name: FFALoRA,
    FedMeZO.name: FedMeZO,
    PFedLoRA.name: PFedLoRA,
}


def strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        raise ConfigError(
            f"config field 'strategy.name': unknown strategy {name!r} (allowed: {', '.join(STRATEGIES)})"
        )
    return STRATEGIES[name]


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
    validate_strategy_config(cfg.strategy)
    cls = strategy_class(cfg.strategy.name)
    reason = cls.refusal(cfg, cls.Options.model_validate(cfg.strategy.options))
    if reason is not None:
        raise ConfigError(reason)


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    """The configured strategy, after :func:`check_experiment` (however the config was made)."""
    check_experiment(cfg)
    cls = strategy_class(cfg.strategy.name)
    return cls(cls.Options.model_validate(cfg.strategy.options))
