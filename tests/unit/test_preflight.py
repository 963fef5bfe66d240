"""One preflight per process entry: the config layer reads and validates the schema alone; the registry
checks run once per config content in a process, however many entries it passes (load, build, run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fedlora import ConfigError, load_config
from fedlora.config import loader
from fedlora.preflight import check_experiment
from fedlora.strategies.fedavg import FedIT


def test_the_config_layer_imports_no_registry_no_method_and_no_torch() -> None:
    code = (
        "import sys, fedlora.config.loader as l; l.read_config(None, ['strategy.name=no-such-method']); "
        "print(sorted(m for m in sys.modules if m.startswith(('fedlora.strategies', 'fedlora.data', "
        "'fedlora.eval', 'torch'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"  # a schema-valid config; the unknown method is the preflight's to find


def test_the_preflight_names_what_the_schema_cannot_know() -> None:
    cfg = loader.read_config(None, ["strategy.name=no-such-method"])
    with pytest.raises(ConfigError, match="strategy.name.*no-such-method"):
        check_experiment(cfg)
    with pytest.raises(ConfigError, match="eval.metrics.*no-such-metric"):
        load_config(None, ["eval.metrics=[no-such-metric]"])


def test_the_method_is_checked_once_however_many_entries_a_config_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora.runner import build_simulation

    calls: list[str] = []
    refusal = FedIT.refusal.__func__  # type: ignore[attr-defined]

    def counted(cls, facts, options):  # type: ignore[no-untyped-def]
        calls.append(cls.name)
        return refusal(cls, facts, options)

    monkeypatch.setattr(FedIT, "refusal", classmethod(counted))
    overrides = tiny_overrides(tmp_path, **{"strategy.name": "fedit", "federation.seed": 4242})
    cfg = load_config(None, overrides)  # the CLI's entry
    build_simulation(cfg)  # the runner's entry, same content
    build_simulation(load_config(None, overrides))  # read again: the same content is not checked again
    assert calls == ["fedit"]
    cfg.federation.rounds += 1  # another content: checked
    build_simulation(cfg, for_training=False)
    assert calls == ["fedit", "fedit"]


def test_a_bad_key_is_reported_before_torch_or_transformers_is_imported() -> None:
    """`fedlora run badkey=1` fails on the schema alone: no heavy library is imported on that path."""
    code = (
        "import sys, fedlora.cli as cli; rc = cli._main(['run', 'badkey=1']); "
        "print(rc, sorted(m for m in ('torch', 'transformers', 'peft', 'flwr', 'datasets') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []"
    assert "config field 'badkey': unknown key" in done.stderr


def test_a_data_source_says_which_tasks_it_supplies() -> None:
    """The fact lives on the registered source (register_data_source(name, tasks=...)), checked by the
    preflight: BBC News is labelled data, reasoning-gym text; a source registered without tasks takes both."""
    with pytest.raises(ConfigError, match="model.task.*'bbc-news' supplies labelled"):
        load_config(None, ["data.source=bbc-news"])
    with pytest.raises(ConfigError, match="model.task.*'reasoning-gym' supplies text"):
        load_config(None, ["model.task=classification"])
    from fedlora.data.federation import DATA_SOURCES, source_tasks

    assert source_tasks(DATA_SOURCES.get("json")) == ("causal-lm", "classification")
