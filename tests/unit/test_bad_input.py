"""Bad input that the other test files do not already cover: each gets a clear error or a counted warning."""

import json
import re
from pathlib import Path

import pytest

from fedlora import load_config
from fedlora.config.loader import ConfigError
from fedlora.data.federation import build_federation

PACKAGE = Path(__file__).resolve().parents[2] / "fedlora"


def test_empty_clients_are_dropped_with_a_warning_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ni.jsonl"
    records = [
        {
            "client_id": i,
            "task": f"t{i}",
            "instruction": "i",
            "train": [{"input": "x", "output": "y"}] * (i % 3),
        }
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(None, ["data.source=natural-instructions", f"data.path={path}"])
    fed = build_federation(cfg)
    assert len(fed.clients) == 4 and fed.dropped_empty == 2
    assert "dropped 2 client(s) with no training examples" in caplog.text
    assert "2 empty clients dropped" in fed.description


def test_gguf_without_the_gguf_package_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from fedlora.models import convert

    real = importlib.util.find_spec
    monkeypatch.setattr(
        convert.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name)
    )
    with pytest.raises(RuntimeError, match="needs the 'gguf' package: pip install gguf"):
        convert.convert_gguf_to_folder(tmp_path / "m.gguf", tmp_path / "out")


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("client.lr=-0.1", "client.lr"),
        ("federation.min_replies=0", "federation.min_replies"),
        ("faults.dropout=0.7", "dropout + straggler + corrupt"),
        ("resources.distribution=pareto", "resources.distribution"),
        ("resources.shares=[1, 2]", "shares are only for distribution 'custom'"),
        ("privacy.delta=2", "privacy.delta"),
    ],
)
def test_impossible_values_fail_before_any_work(override: str, fragment: str) -> None:
    extra = ["faults.corrupt=0.5"] if override.startswith("faults.dropout") else []
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, [override, *extra])


def test_no_pickle_anywhere_a_file_or_message_comes_in() -> None:
    """Loading user files and wire payloads goes through safetensors and JSON only."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*import pickle|^\s*from pickle|torch\.load\(|pickle\.loads?\(", text, re.MULTILINE):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []
