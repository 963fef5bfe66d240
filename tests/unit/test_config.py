from pathlib import Path

import pytest

from fedlora import ConfigError, load_config
from fedlora.config.loader import apply_overrides, parse_override
from fedlora.preflight import config_from_dict


def test_builtin_default_is_valid() -> None:
    cfg = load_config()
    assert cfg.model.name == "smollm2-135m-instruct"
    assert cfg.strategy.name == "fedit"


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(
        None,
        [
            "federation.rounds=3",
            "adapter.rank=4",
            "adapter.target_modules=[q_proj]",
            "client.local_steps=null",
            "client.local_epochs=1.5",
        ],
    )
    assert cfg.federation.rounds == 3 and cfg.adapter.rank == 4
    assert cfg.adapter.target_modules == ["q_proj"]
    assert cfg.client.local_steps is None and cfg.client.local_epochs == 1.5
    assert parse_override("a.b=1e-3") == (["a", "b"], 1e-3)


def test_unknown_key_names_field_and_known_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["adapter.rnak=4"])
    text = str(err.value)
    assert "adapter.rnak" in text and "unknown key" in text and "rank" in text


def test_bad_literal_names_value_and_allowed() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["client.optimizer=adam"])
    text = str(err.value)
    assert "client.optimizer" in text and "'adam'" in text and "'adamw'" in text and "'sgd'" in text


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("client.lr=-0.1", "client.lr"),
        ("adapter.rank=0", "adapter.rank"),
        ("federation.rounds=zero", "federation.rounds"),
        ("data.eval_fraction=0.6", "data"),
    ],
)
def test_impossible_values_name_the_field(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override, "data.test_fraction=0.5"] if field == "data" else [override])


def test_clients_per_round_above_num_clients() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        load_config(None, ["federation.num_clients=3", "federation.clients_per_round=5"])


def test_unknown_strategy_and_option() -> None:
    with pytest.raises(ConfigError, match=r"strategy\.name.*allowed: fedit, fedavg, fedprox"):
        load_config(None, ["strategy.name=fedsgd"])
    with pytest.raises(ConfigError, match=r"strategy\.options\.nu.*options of fedprox: mu"):
        load_config(None, ["strategy.name=fedprox", "strategy.options={nu: 0.1}"])
    cfg = load_config(None, ["strategy.name=fedprox", "strategy.options={mu: 0.1}"])
    assert cfg.strategy.options == {"mu": 0.1}


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_override_into_value_is_refused() -> None:
    with pytest.raises(ConfigError, match="is a value"):
        apply_overrides({"name": "x"}, ["name.sub=1"])


def test_classification_needs_labelled_data() -> None:
    with pytest.raises(ConfigError, match="model.task"):
        config_from_dict({"data": {"source": "bbc-news"}})


def test_shipped_configs_are_valid() -> None:
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_relative_paths_are_read_against_the_config_file_and_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.yaml"
    config.write_text("data: {source: json, path: ../data/d.jsonl}\noutput: {root: ../runs}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(config)
    assert cfg.data.path == str(tmp_path / "data" / "d.jsonl") and cfg.output.root == str(tmp_path / "runs")
    override = load_config(config, ["data.path=local.jsonl"])  # overrides: against the current directory
    assert override.data.path == str(elsewhere / "local.jsonl")
    assert load_config(None, ["model.name=./my-model"]).model.name == str(elsewhere / "my-model")
    assert load_config(None, ["model.name=tiny-llama"]).model.name == "tiny-llama"  # a name stays a name


def test_one_override_rule_for_run_sweep_flower_and_the_api() -> None:
    """Overrides alone start from the schema's defaults in every entry point: the CLI's run, sweep and
    flower, and ``fedlora.load_config(None, ...)``; nothing at all is the built-in demo."""
    from fedlora.config import loader
    from fedlora.sweep import sweep_configs

    overrides = ["strategy.name=fedprox", "federation.rounds=2"]
    from fedlora.preflight import check_experiment

    reference = check_experiment(loader.schema_config_from_overrides(overrides))
    assert reference.client.optimizer == "sgd"  # fedprox's own, written in by the preflight
    assert load_config(None, overrides) == reference
    assert load_config(None, overrides).federation.clients_per_round is None  # not the demo's 4
    assert load_config().name == "default-fedit-reasoning-gym"
    [(_, cfg)] = sweep_configs(None, [], [0], overrides)
    assert cfg.federation.clients_per_round is None and cfg.strategy.name == "fedprox"
    [(_, cfg)] = sweep_configs(None, ["strategy.name=fedprox"], [0])  # nothing given: the demo's grid
    assert cfg.federation.clients_per_round == 4 and cfg.federation.rounds == 5


def test_a_plain_alpaca_file_runs_with_no_extra_keys(tmp_path: Path) -> None:
    """No category field: partition.method auto splits it iid into 8 clients (or federation.num_clients)."""
    import json

    from fedlora.data.federation import build_federation

    path = tmp_path / "alpaca.json"
    rows = [{"instruction": f"Add {i} and 1.", "input": "", "output": str(i + 1)} for i in range(40)]
    path.write_text(json.dumps(rows))
    fed = build_federation(load_config(None, ["data.source=json", f"data.path={path}"]))
    assert len(fed.clients) == 8 and sum(fed.sizes()) + sum(fed.sizes("eval")) + sum(fed.sizes("test")) == 40
    fed = build_federation(
        load_config(None, ["data.source=json", f"data.path={path}", "federation.num_clients=3"])
    )
    assert len(fed.clients) == 3
    categorised = [{**r, "category": f"c{i % 2}"} for i, r in enumerate(rows)]
    path.write_text(json.dumps(categorised))
    fed = build_federation(load_config(None, ["data.source=json", f"data.path={path}"]))
    assert [c.name for c in fed.clients] == ["c0", "c1"]  # categories present: one client per category


def test_fedlora_config_prints_every_key_with_its_help_and_the_reference_is_current(capsys) -> None:
    """``fedlora config`` prints the config run would run (the same arguments) with every key's help as a
    comment; it reads back as the same config; docs/config-reference.md is what --markdown prints."""
    import yaml

    from fedlora.cli import main
    from fedlora.config.reference import markdown_reference, reference

    assert main(["config", "federation.rounds=7", "strategy.name=fedprox"]) == 0
    text = capsys.readouterr().out
    assert load_config(None, ["federation.rounds=7", "strategy.name=fedprox"]) == config_from_dict(
        yaml.safe_load(text)
    )
    assert "# communication rounds" in text and "rounds: 7" in text
    assert "optimizer: sgd" in text  # fedprox's default optimizer, written in as run writes it
    assert main(["config", "strategy.name=nope"]) == 2  # what run refuses, config refuses
    assert "config field 'strategy.name': unknown strategy 'nope'" in capsys.readouterr().err
    missing = [k.key for _, _, keys in reference() for k in keys if not k.help]
    assert missing == [], f"keys without help (add a #: comment above the field): {missing}"
    reference_file = Path(__file__).resolve().parents[2] / "docs" / "config-reference.md"
    assert reference_file.read_text() == markdown_reference(), (
        "run: fedlora config --markdown > docs/config-reference.md"
    )


def test_help_lists_the_registered_names(capsys) -> None:
    import pytest

    from fedlora.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    lines = {
        line.split(":")[0].strip(): line for line in capsys.readouterr().out.splitlines() if ": " in line
    }
    assert {"fedit", "flexlora", "hetlora", "fed-sb"} <= set(
        lines["strategy.name"].split(": ")[1].split(", ")
    )
    assert {"json", "hf", "natural-instructions"} <= set(lines["data.source"].split(": ")[1].split(", "))


def test_help_names_read_from_source_are_the_live_registries() -> None:
    """``fedlora --help`` reads the built-ins' names from the source (no torch): every name a fedlora module
    registers is there, and nothing else."""
    from fedlora.data.federation import DATA_SOURCES
    from fedlora.data.partition import PARTITIONERS
    from fedlora.eval.registry import METRICS
    from fedlora.help_names import builtin_names
    from fedlora.preflight import load_builtins
    from fedlora.strategies.registry import STRATEGIES

    load_builtins()
    read = builtin_names()
    for row, registry in (
        ("strategy.name", STRATEGIES),
        ("data.source", DATA_SOURCES),
        ("partition.method", PARTITIONERS),
        ("eval.metrics", METRICS),
    ):
        ours = sorted(n for n in registry.names() if registry.get(n).__module__.startswith("fedlora."))
        assert read[row] == ours, row


def test_help_and_version_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\nfrom fedlora.cli import main\n"
        "for args in (['--help'], ['run', '--help'], ['--version']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "        main(args)\n"
        "    assert out.getvalue(), args\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
    # a name no built-in registers is refused from the source's names, before the registries' imports; the
    # same name registered by a plugin module passes (the registries decide once a plugin is imported)
    refused = (
        "import sys\nfrom fedlora.cli import main\n"
        "code = main(['run', 'strategy.name=nope', 'data.source=reasoning-gym'])\n"
        "print(code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", refused], capture_output=True, text=True)
    assert done.stdout.split() == ["2", "False"], done.stderr
    assert "config field 'strategy.name': unknown strategy 'nope' (allowed: fed-sb, fedavg" in done.stderr
