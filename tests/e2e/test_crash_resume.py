"""SIGKILL at random moments, then resume: the same final adapter as an uninterrupted run, never a corrupt
checkpoint."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora.engine.checkpoint import latest_checkpoint, list_rounds, load_checkpoint

ROUNDS = 4


def command(run_dir: Path, overrides: list[str]) -> list[str]:
    if (run_dir / "config.yaml").exists():
        return [sys.executable, "-m", "fedlora", "run", "--resume", str(run_dir), "--no-progress"]
    return [sys.executable, "-m", "fedlora", "run", *overrides, "--output", str(run_dir), "--no-progress"]


def test_sigkill_at_random_points_then_resume_gives_the_same_adapter(tmp_path: Path) -> None:
    overrides = tiny_overrides(
        tmp_path,
        **{
            "federation.rounds": ROUNDS,
            "adapter.dropout": 0.1,
            "faults.corrupt": 0.2,
            "output.keep_checkpoints": 2,
        },
    )
    env = {**os.environ, "FEDLORA_CACHE": os.environ["FEDLORA_CACHE"], "PYTHONHASHSEED": "0"}
    straight = tmp_path / "straight"
    started = time.perf_counter()
    subprocess.run(command(straight, overrides), check=True, env=env, capture_output=True)
    full_time = time.perf_counter() - started
    reference = load_file(str(straight / "global" / "adapter_model.safetensors"))

    rng = random.Random(1234)
    kills = 0
    for trial in range(3):
        run_dir = tmp_path / f"killed-{trial}"
        trial_kills = 0
        while not (run_dir / "global" / "adapter_model.safetensors").exists():
            proc = subprocess.Popen(
                command(run_dir, overrides), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            # a fresh start runs as long as the straight run: killed before 0.75 of it; after 2 kills, it finishes
            timeout = rng.uniform(0.3, 0.75 * full_time) if trial_kills < 2 else 600
            try:
                proc.wait(timeout=timeout)
                assert proc.returncode == 0, proc.stderr.read().decode()[-2000:]
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                trial_kills += 1
            # whatever the moment of the kill, every checkpoint left on disk is complete and verifiable
            root = run_dir / "checkpoints"
            for n in list_rounds(root):
                assert load_checkpoint(root / f"round_{n}").round == n
            latest_checkpoint(root)
        final = load_file(str(run_dir / "global" / "adapter_model.safetensors"))
        assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == ROUNDS  # no round lost or logged twice
    assert kills >= 3
