"""output.trackers: W&B (offline) and MLflow (local file store) receive the config, every round's numbers at
step = round, the summary and the curves; a resume continues the same tracker runs."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.config.loader import ConfigError
from fedlora.runner import run_experiment

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(path: Path, wait_s: float = 60.0) -> list:
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each chunk = crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last)), once the file
    holds the run's ``exit`` record: W&B's service writes the file on its own and can still be flushing it when
    ``run.finish()`` has returned (seen once in CI: a file read at that moment had no history yet)."""
    deadline = time.monotonic() + wait_s
    records = parse_wandb_file(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = parse_wandb_file(path)
    return records


def parse_wandb_file(path: Path) -> list:
    """Every complete record in the file as it is now."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block = path.read_bytes(), 7, 32768
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a chunk still being written
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, float]]:
    """Round -> logged numbers, over every offline file of the run (a resume writes a file of its own)."""
    history = {}
    records = [
        r for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) for r in wandb_records(path)
    ]
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            if "train_loss" in items:
                history[int(items["_step"])] = items
    return history


def test_wandb_and_mlflow_receive_config_rounds_summary_and_curves(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    overrides = {"output.trackers": "[wandb, mlflow]", "output.plot": "true", "output.tracking_project": "t"}
    cfg = load_config(None, tiny_overrides(tmp_path, **overrides))
    run_dir = run_experiment(cfg, tmp_path / "run", show_progress=False)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ids = json.loads((run_dir / "trackers.json").read_text())

    history = wandb_history(run_dir)
    assert sorted(history) == [1, 2]
    for record in logged:
        assert history[record["round"]]["train_loss"] == pytest.approx(record["train_loss"], rel=1e-12)
        assert history[record["round"]]["bytes_up"] == record["bytes_up"]
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")  # one session so far: one offline file
    runs = [r.run for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert (
        config["client"]["lr"] == cfg.client.lr and runs[0].project == "t" and runs[0].run_id == ids["wandb"]
    )

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    run = client.get_run(ids["mlflow"])
    assert run.data.params["client.lr"] == json.dumps(cfg.client.lr) and run.info.status == "FINISHED"
    losses = client.get_metric_history(ids["mlflow"], "train_loss")
    assert [(m.step, m.value) for m in losses] == [(r["round"], r["train_loss"]) for r in logged]
    assert {a.path for a in client.list_artifacts(ids["mlflow"])} == {"curves.png", "metrics.jsonl"}

    # a resume (one more round) continues the same tracker runs
    more = load_config(None, tiny_overrides(tmp_path, **overrides, **{"federation.rounds": 3}))
    from fedlora.runner import run

    run(more, run_dir, resume=True, show_progress=False)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "train_loss")] == [1, 2, 3]
    assert sorted(wandb_history(run_dir)) == [1, 2, 3]
    resumed_runs = {
        r.run.run_id
        for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")
        for r in wandb_records(p)
        if r.WhichOneof("record_type") == "run"
    }
    assert resumed_runs == {ids["wandb"]}


def test_unknown_or_missing_tracker_is_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    cfg = load_config(None, tiny_overrides(tmp_path, **{"output.trackers": "[neptune]"}))
    with pytest.raises(
        ConfigError, match=r"output.trackers': unknown tracker 'neptune' \(allowed: tensorboard"
    ):
        run_experiment(cfg, tmp_path / "a", show_progress=False)
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = load_config(None, tiny_overrides(tmp_path, **{"output.trackers": "[wandb]"}))
    with pytest.raises(
        ConfigError, match=r"wandb needs the wandb package \(pip install 'fedlora\[wandb\]'\)"
    ):
        run_experiment(cfg, tmp_path / "b", show_progress=False)
