"""experiments/records.py: a run saved into the repository's records and restored on another path resumes to
the same final adapter as a run that was never interrupted, and a finished run's record keeps its adapter."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "records.py"
ROUNDS = 3


def load_records_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("records", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def fedlora(*args: str) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "fedlora", *args, "--no-progress"], env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_saved_then_restored_run_resumes_to_the_uninterrupted_adapter(tmp_path: Path) -> None:
    records = load_records_module()
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": ROUNDS, "output.keep_checkpoints": ROUNDS})
    runs = tmp_path / "runs"
    finished = runs / "claim" / "finished_seed-0"
    fedlora("run", *overrides, "--output", str(finished))
    reference = load_file(str(finished / "global" / "adapter_model.safetensors"))

    # the same run as it stands after an interruption at the end of round 2: no global adapter, 2 logged rounds
    unfinished = runs / "claim" / "unfinished_seed-0"
    shutil.copytree(finished, unfinished)
    shutil.rmtree(unfinished / "global")
    shutil.rmtree(unfinished / "checkpoints" / f"round_{ROUNDS}")
    metrics = unfinished / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[: ROUNDS - 1]))
    (runs / "claim" / "base-model_seed-0.json").write_text('{"eval_loss": 3.0}\n')

    kept = tmp_path / "repo" / "experiments" / "records"
    saved = records.save(runs, kept)
    assert len(saved) == 3 and records.save(runs, kept) == []  # a second save has nothing newer to copy
    assert (kept / "claim" / "finished_seed-0" / "global" / "adapter_model.safetensors").exists()
    assert not (kept / "claim" / "finished_seed-0" / "checkpoints").exists()
    kept_checkpoints = sorted(
        p.name for p in (kept / "claim" / "unfinished_seed-0" / "checkpoints").iterdir()
    )
    assert kept_checkpoints == [f"round_{ROUNDS - 1}"]  # only the newest
    assert records.rounds_logged(kept / "claim" / "unfinished_seed-0") == ROUNDS - 1

    # a new machine: nothing under runs/ but what the records bring back, on another path
    elsewhere = tmp_path / "new-machine" / "runs"
    restored = records.restore(kept, elsewhere)
    assert len(restored) == 3 and records.restore(kept, elsewhere) == []
    assert (elsewhere / "claim" / "base-model_seed-0.json").read_text() == '{"eval_loss": 3.0}\n'
    resumed = elsewhere / "claim" / "unfinished_seed-0"
    fedlora("run", "--resume", str(resumed))
    final = load_file(str(resumed / "global" / "adapter_model.safetensors"))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    assert records.rounds_logged(resumed) == ROUNDS

    # the resumed run, now finished, replaces its unfinished record: the adapter in, the checkpoint out
    assert records.save(elsewhere, kept) == [f"saved {resumed}: {ROUNDS} rounds, finished"]
    assert (kept / "claim" / "unfinished_seed-0" / "global").is_dir()
    assert not (kept / "claim" / "unfinished_seed-0" / "checkpoints").exists()


def test_a_folder_too_large_for_the_repository_is_left_out_and_said(tmp_path: Path) -> None:
    records = load_records_module()
    run = tmp_path / "runs" / "claim" / "whole-model_seed-0"
    (run / "global").mkdir(parents=True)
    for name in ("config.yaml", "run.json", "metrics.jsonl"):
        (run / name).write_text("{}\n")
    (run / "global" / "model.safetensors").write_bytes(bytes(2 * 2**20))
    records.MAX_KEPT_MB = 1.0
    [line] = records.save(tmp_path / "runs", tmp_path / "kept")
    assert "global, 2 MB, not kept: over 1 MB" in line
    kept = tmp_path / "kept" / "claim" / "whole-model_seed-0"
    assert (kept / "metrics.jsonl").read_text() == "{}\n" and not (kept / "global").exists()
