"""Preflight: every check a config must pass before any model or data is touched.

``fedlora/config`` reads and validates the schema alone (it imports no registry); this module checks what
needs the registries: the plugins import, the strategy and its options exist, the method can honour the
experiment (:meth:`Strategy.refusal`), the data source, partitioner and evaluators are known. Each process
entry calls :func:`check_experiment` once (the runner, the CLI, a worker process, a Flower node); a config of
the same content is checked once per process however many entries it passes.

:func:`load_config` is the public ``fedlora.load_config``: read (YAML + dotted overrides) and preflight.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import loader
from fedlora.config.schema import ExperimentConfig
from fedlora.config.sections.training import OptimizerName
from fedlora.errors import ConfigError
from fedlora.registry import Registry, UnknownName, import_plugins, unknown_name_message

if TYPE_CHECKING:
    from fedlora.strategies.base import ExperimentFacts

#: configs checked in this process (their content) -> the optimizer their strategy resolved
_CHECKED: dict[str, OptimizerName | None] = {}


def load_builtins() -> None:
    """Import every built-in method and generic client hook (each registers itself by name), so that hook
    objects arriving as JSON decode in any process."""
    import fedlora.client.clipping  # noqa: F401
    import fedlora.client.frozen  # noqa: F401
    import fedlora.client.zeroth_order  # noqa: F401
    import fedlora.strategies  # noqa: F401


def prepare_node(plugins: list[str]) -> None:
    """The entry of a process that only runs clients (a worker, a Flower node): the plugins and every
    built-in method imported, so that the hook objects of any instruction decode (the experiment itself was
    preflighted where it started)."""
    try:
        import_plugins(plugins)
    except UnknownName as err:
        raise ConfigError(str(err)) from None
    load_builtins()


def experiment_facts(cfg: ExperimentConfig) -> ExperimentFacts:
    """The facts of ``cfg`` a method may refuse it for (:meth:`Strategy.refusal`)."""
    from fedlora.strategies.base import ExperimentFacts

    return ExperimentFacts(
        task=cfg.model.task,
        quantized=cfg.model.quantization is not None,
        num_variants=len(cfg.model.variants),
        shared_adapter=cfg.model.shared_adapter,
        privacy=cfg.privacy.dp_sgd,
        client_privacy=cfg.privacy.client_level,
        secure_aggregation=cfg.federation.secure_aggregation,
        gradient_accumulation_steps=cfg.client.gradient_accumulation_steps,
        lr_scheduler=cfg.client.lr_scheduler,
        weight_decay=cfg.client.weight_decay,
        use_dora=cfg.adapter.use_dora,
        base_dtype=cfg.compute.base_dtype,
    )


#: the config fields a built-in registry answers, and what the registry calls its entries
EARLY_CHECKED = {"strategy.name": "strategy", "data.source": "data source", "partition.method": "partitioner"}


def refuse_unknown_names_early(cfg: ExperimentConfig) -> None:
    """Without plugins, refuse a strategy, data source or partitioner that no built-in module registers (read
    from the source: :func:`fedlora.help_names.builtin_names`) and no installed entry point offers, before
    the registries' imports (torch, transformers, peft: about 9 s on a 2-core CPU). With plugins, their
    imports may register any name: the registries decide. So do they once imported (a name registered in
    this process, ``fedlora.register_strategy`` without a plugin module, is theirs to know)."""
    registries = ("fedlora.strategies.registry", "fedlora.data.federation", "fedlora.data.partition")
    if cfg.plugins or any(module in sys.modules for module in registries):
        return
    from importlib.metadata import entry_points

    from fedlora.help_names import ROWS, builtin_names

    known = builtin_names()
    for field, kind in EARLY_CHECKED.items():
        section, key = field.split(".")
        value = getattr(getattr(cfg, section), key)
        plugged = sorted({p.name for p in entry_points(group=ROWS[field][2])} - set(known[field]))
        if value not in known[field] and value not in plugged:
            raise ConfigError(unknown_name_message(field, kind, value, [*known[field], *plugged]))


def check_experiment(cfg: ExperimentConfig) -> ExperimentConfig:
    """Raise :class:`ConfigError`, naming the field, unless every registry knows what ``cfg`` names and its
    strategy can run it; returns ``cfg``. Plugins are imported first, so their names count."""
    content = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    if content in _CHECKED:
        if cfg.client.optimizer is None:
            cfg.client.optimizer = _CHECKED[content]
        return cfg
    refuse_unknown_names_early(cfg)
    try:
        import_plugins(cfg.plugins)
    except UnknownName as err:
        raise ConfigError(str(err)) from None
    load_builtins()
    from fedlora.data.federation import DATA_SOURCES, source_tasks
    from fedlora.data.partition import PARTITIONERS
    from fedlora.eval.benchmarks import check_task_names
    from fedlora.eval.generation import SCORERS
    from fedlora.eval.registry import METRICS, metric_sources
    from fedlora.strategies.registry import strategy_class, validate_strategy_options

    options = validate_strategy_options(cfg.strategy)
    cls = strategy_class(cfg.strategy.name)
    reason = cls.refusal(experiment_facts(cfg), options)
    if reason is not None:
        raise ConfigError(reason)
    resolve_strategy_defaults(cfg, cls(options))
    for registry, value in ((DATA_SOURCES, cfg.data.source), (PARTITIONERS, cfg.partition.method)):
        if value not in registry:
            raise ConfigError(unknown_name_message(registry.field, registry.kind, value, registry.names()))
    tasks = source_tasks(DATA_SOURCES.get(cfg.data.source))
    if cfg.model.task not in tasks:
        kind = "labelled (classification)" if tasks == ("classification",) else "text (causal-lm)"
        raise ConfigError(
            f"config field 'model.task': data.source {cfg.data.source!r} supplies {kind} data, not "
            f"{cfg.model.task}: set model.task to {tasks[0]!r} or use another data.source"
        )
    for field in ("metrics", "final_metrics"):
        unknown = [m for m in getattr(cfg.eval, field) if m not in METRICS]
        if unknown:
            raise ConfigError(
                f"config field 'eval.{field}': unknown evaluator(s) {unknown} (allowed: {', '.join(METRICS.names())})"
            )
    try:
        check_task_names(cfg.eval.tasks, "config field 'eval.tasks'")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    wanted = [*cfg.eval.metrics, *cfg.eval.final_metrics]
    for name in wanted:
        sources = metric_sources(METRICS.get(name))
        if sources is not None and cfg.data.source not in sources:
            raise ConfigError(
                f"config field 'eval.metrics': {name} uses {' or '.join(sources)}'s scorers; "
                f"data.source is {cfg.data.source!r}"
            )
    generation = [m for m in wanted if m in SCORERS]
    if generation and cfg.model.task != "causal-lm":
        raise ConfigError(
            f"config field 'eval.metrics': {generation} need generations; model.task is {cfg.model.task!r} (use loss)"
        )
    _CHECKED[content] = cfg.client.optimizer  # as given (before the defaults were written in)...
    _CHECKED[json.dumps(cfg.model_dump(mode="json"), sort_keys=True)] = cfg.client.optimizer  # ...and after
    return cfg


def resolve_strategy_defaults(cfg: ExperimentConfig, strategy: Any) -> ExperimentConfig:
    """Write into ``cfg`` the settings the strategy resolves when the config leaves them unset, so that
    ``config.yaml`` and ``compare`` show what ran (fedit trains with AdamW, fedavg/fedprox with SGD: a
    ``client.optimizer: null`` in the record would hide that two methods compared different optimizers)."""
    if cfg.client.optimizer is None:
        cfg.client.optimizer = strategy.default_optimizer
    return cfg


def config_from_dict(tree: dict[str, Any]) -> ExperimentConfig:
    """Validate a nested dict (schema, then preflight), raising :class:`ConfigError`."""
    return check_experiment(loader.schema_config(tree))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read ``path`` with dotted overrides (no path: the schema's defaults; nothing at all: the built-in demo
    experiment, :func:`fedlora.config.loader.read_config`), validate it and preflight it."""
    return check_experiment(loader.read_config(path, overrides))


def config_from_overrides(overrides: list[str]) -> ExperimentConfig:
    """A config from command-line overrides alone (the schema's defaults), preflighted."""
    return check_experiment(loader.schema_config_from_overrides(overrides))


def registered_names() -> str:
    """The strategies, data sources, partitioners and metrics registered now (built-ins and plugins), for
    ``--help``."""
    from fedlora.data.federation import DATA_SOURCES
    from fedlora.data.partition import PARTITIONERS
    from fedlora.eval.registry import METRICS
    from fedlora.strategies.registry import STRATEGIES

    load_builtins()
    rows: list[tuple[str, Registry[Any]]] = [
        ("strategy.name", STRATEGIES),
        ("data.source", DATA_SOURCES),
        ("partition.method", PARTITIONERS),
        ("eval.metrics", METRICS),
    ]
    return "\n".join(f"  {field}: {', '.join(sorted(registry.names()))}" for field, registry in rows)
