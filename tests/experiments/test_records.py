"""experiments/records.py: a record keeps a run's configs, metrics and a checksummed manifest of its weights,
never the weights; the manifest names exactly the adapter that the recorded config regenerates."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import tiny_overrides

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "records.py"
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


def test_records_keep_no_weights_and_their_checksums_name_the_regenerated_adapter(tmp_path: Path) -> None:
    records = load_records_module()
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": ROUNDS, "output.keep_checkpoints": ROUNDS})
    runs = tmp_path / "runs"
    finished = runs / "claim" / "finished_seed-0"
    fedlora("run", *overrides, "--output", str(finished))

    # the same run as it stands after an interruption at the end of round 2: no global adapter, 2 logged rounds
    unfinished = runs / "claim" / "unfinished_seed-0"
    shutil.copytree(finished, unfinished)
    shutil.rmtree(unfinished / "global")
    shutil.rmtree(unfinished / "checkpoints" / f"round_{ROUNDS}")
    metrics = unfinished / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[: ROUNDS - 1]))
    (runs / "claim" / "base-model_seed-0.json").write_text('{"eval_loss": 3.0}\n')
    (runs / "claim" / "rates.txt").write_text("tuned rate: 0.5\n")  # a script's note beside its runs

    kept = tmp_path / "repo" / "experiments" / "records"
    saved = records.save(runs, kept)
    assert len(saved) == 4 and records.save(runs, kept) == []  # a second save has nothing newer to copy
    assert (kept / "claim" / "rates.txt").read_text() == "tuned rate: 0.5\n"
    (runs / "claim" / "rates.txt").write_text("tuned rate: 1.0\n")  # a note rewritten: saved again
    assert records.save(runs, kept) == [f"saved {kept / 'claim' / 'rates.txt'}"]
    # a finished run scored on benchmarks later (fedlora eval --tasks): its record gains eval/tasks.json
    (finished / "eval").mkdir(exist_ok=True)
    (finished / "eval" / "tasks.json").write_text('{"tasks": {}}\n')
    assert [line.split(":")[0] for line in records.save(runs, kept)] == [f"saved {finished}"]
    assert (kept / "claim" / "finished_seed-0" / "eval" / "tasks.json").read_text() == '{"tasks": {}}\n'
    assert records.save(runs, kept) == []
    assert (
        sorted(
            p.suffix
            for p in kept.rglob("*")
            if p.is_file() and p.suffix not in (".json", ".jsonl", ".yaml", ".txt")
        )
        == []
    )
    manifest = json.loads((kept / "claim" / "finished_seed-0" / "weights.json").read_text())
    adapter = finished / "global" / "adapter_model.safetensors"
    [entry] = [e for e in manifest["files"] if e["path"] == "global/adapter_model.safetensors"]
    assert entry["sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    assert entry["bytes"] == adapter.stat().st_size and manifest["finished"] and manifest["rounds"] == ROUNDS
    partial = json.loads((kept / "claim" / "unfinished_seed-0" / "weights.json").read_text())
    assert not partial["finished"] and {e["path"].split("/")[1] for e in partial["files"]} == {
        f"round_{ROUNDS - 1}"
    }

    # a new machine: the finished record comes back as a finished run without weights; the unfinished one does not
    elsewhere = tmp_path / "new-machine" / "runs"
    restored = records.restore(kept, elsewhere)
    assert (
        len(restored) == 4
        and "not restored" in restored[1]
        and records.restore(kept, elsewhere)[:1] == restored[1:2]
    )
    assert (elsewhere / "claim" / "base-model_seed-0.json").read_text() == '{"eval_loss": 3.0}\n'
    assert (elsewhere / "claim" / "rates.txt").read_text() == "tuned rate: 1.0\n"
    back = elsewhere / "claim" / "finished_seed-0"
    assert records.rounds_logged(back) == ROUNDS and (back / "global" / "weights.json").exists()
    assert not (elsewhere / "claim" / "unfinished_seed-0").exists()
    assert records.save(elsewhere, kept) == []  # a restored record is not saved over its manifest

    # the recorded config regenerates the adapter the checksums name; another seed does not
    again = tmp_path / "regenerated"
    fedlora("run", str(kept / "claim" / "finished_seed-0" / "config.yaml"), "--output", str(again))
    assert records.verify(again, kept / "claim" / "finished_seed-0") == []
    other = tmp_path / "other-seed"
    fedlora(
        "run",
        str(kept / "claim" / "finished_seed-0" / "config.yaml"),
        "federation.seed=7",
        "--output",
        str(other),
    )
    assert "global/adapter_model.safetensors" in " ".join(
        records.verify(other, kept / "claim" / "finished_seed-0")
    )
