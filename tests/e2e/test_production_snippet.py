"""The README's "Use the adapter in production" snippet, run exactly as written (the code block extracted)
on a real SmolLM2 run at the folder it names; and what `global/` holds for production: the hub id as the
base model, the tokenizer, a model card, files of the normal mode."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.engine.run_folder import default_file_mode

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "fedlora" / "config" / "builtin" / "default.yaml"


def readme_block(heading: str) -> str:
    """The first ```python block under ``heading`` in README.md."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readmes_production_snippet_runs_as_written(tmp_path: Path) -> None:
    snippet = readme_block("## Use the adapter in production")
    run = re.search(r'^run = "([^"]+)"', snippet, re.M).group(1)
    models = Path(os.environ["FEDLORA_CACHE"]) / "models"
    home = tmp_path / "home"
    (home / ".cache" / "fedlora" / "models").mkdir(parents=True)
    (home / ".cache" / "fedlora" / "models" / "smollm2-135m-instruct").symlink_to(
        (models / "smollm2-135m-instruct").resolve()
    )
    quick = [
        "federation.rounds=1",
        "federation.clients_per_round=2",
        "client.local_steps=1",
        "data.examples_per_task=8",
        "eval.max_clients=1",
        "output.plot=false",
    ]
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    fedlora = [sys.executable, "-m", "fedlora", "run", str(DEFAULT), *quick, "--output", run, "--no-progress"]
    subprocess.run(fedlora, cwd=tmp_path, env=env, check=True, capture_output=True)

    proc = subprocess.run(
        [sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()  # the adapted model's answer

    folder = tmp_path / run / "global"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    info = json.loads((tmp_path / run / "run.json").read_text())
    assert Path(info["base_model"]).is_dir() and info["base_model_id"] == config["base_model_name_or_path"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\nlibrary_name: peft\n")
    for needed in (
        "| method | fedit",
        "| clients | 8 (2 per round) |",
        "| rounds | 1 of 1 |",
        "eval_loss",
        "fedlora",
    ):
        assert needed in card
    assert (folder / "tokenizer_config.json").exists()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()}
    assert set(modes.values()) == {default_file_mode()}, modes
