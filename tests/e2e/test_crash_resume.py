"""SIGKILL at named points (inside a checkpoint's write, round 1's included, between a round's log line and its
checkpoint, mid-training, inside the final export), then resume: the same final adapter and the same per-round
losses as an uninterrupted run, never a corrupt checkpoint.

The kills are not timed by the wall clock (under load such a kill may land after the run ended): each process
is started by ``kill_point.py``, which kills it at the N-th call of a named function, so every scenario kills
exactly where it says on every machine."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora.engine.checkpoint import latest_checkpoint, list_rounds, load_checkpoint

ROUNDS = 4
KILLER = Path(__file__).with_name("kill_point.py")

#: (function as its caller sees it, which call, before/after it runs): one tuple per process start
SCENARIOS = {
    "inside round 1's checkpoint, then between round 2's log line and its checkpoint": [
        ("fedlora.engine.checkpoint:save_file", 1, "after"),
        ("fedlora.tracking.metrics:MetricsLog.append", 2, "after"),
    ],
    "mid-round (replies in, not aggregated), after a checkpoint, then inside the final export": [
        ("fedlora.engine.embedded:EmbeddedEngine.train_clients", 2, "after"),
        ("fedlora.engine.embedded:save_checkpoint", 1, "after"),
        ("fedlora.session.export:replace_folder", 1, "before"),
    ],
    "before a checkpoint's rename, then while an old checkpoint is deleted": [
        ("fedlora.engine.checkpoint:fsync_path", 5, "before"),
        ("fedlora.engine.checkpoint:_discard", 1, "after"),
    ],
}


def command(run_dir: Path, overrides: list[str], kill: tuple[str, int, str] | None) -> list[str]:
    head = (
        [sys.executable, str(KILLER), kill[0], str(kill[1]), kill[2], "--"]
        if kill
        else [
            sys.executable,
            "-m",
            "fedlora",
        ]
    )
    if (run_dir / "config.yaml").exists():
        return [*head, "run", "--resume", str(run_dir), "--no-progress"]
    return [*head, "run", *overrides, "--output", str(run_dir), "--no-progress"]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["round"], r["train_loss"]) for r in map(json.loads, lines)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    tmp_path = tmp_path_factory.mktemp("straight")
    overrides = tiny_overrides(
        tmp_path,
        **{
            "federation.rounds": ROUNDS,
            "adapter.dropout": 0.1,
            "faults.corrupt": 0.2,
            "output.keep_checkpoints": 2,
        },
    )
    run_dir = tmp_path / "run"
    subprocess.run(command(run_dir, overrides, None), check=True, env=env(), capture_output=True)
    return run_dir, overrides


def env() -> dict[str, str]:
    return {**os.environ, "FEDLORA_CACHE": os.environ["FEDLORA_CACHE"], "PYTHONHASHSEED": "0"}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sigkill_at_named_points_then_resume_gives_the_same_adapter(
    name: str, straight: tuple[Path, list[str]], tmp_path: Path
) -> None:
    reference_dir, overrides = straight
    reference = load_file(str(reference_dir / "global" / "adapter_model.safetensors"))
    run_dir = tmp_path / "killed"
    for kill in SCENARIOS[name]:
        proc = subprocess.run(command(run_dir, overrides, kill), env=env(), capture_output=True, text=True)
        assert proc.returncode == -9, f"{kill} was not reached (rc {proc.returncode}): {proc.stderr[-2000:]}"
        # whatever the moment of the kill, every checkpoint left on disk is complete and verifiable
        root = run_dir / "checkpoints"
        for n in list_rounds(root):
            assert load_checkpoint(root / f"round_{n}").round == n
        latest_checkpoint(root)
    proc = subprocess.run(command(run_dir, overrides, None), env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert losses(run_dir) == losses(reference_dir)  # every round once, with the straight run's loss
