"""Off the happy path of a run folder: a full disk is one line and resumable, a forged checkpoint or a record
that disagrees with the checkpoints is refused, and the records say what ran (the effective optimizer)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.cli import main
from fedlora.engine.checkpoint import (
    CheckpointError,
    _meta_digest,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.errors import ConfigError
from fedlora.runner import run


def test_a_checkpoint_needs_its_metadata_checksum_and_the_round_of_its_folder(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    for r in (1, 2):
        save_checkpoint(root, r, {"w": torch.full((2,), float(r))}, {"strategy": "x"})
    meta_path = root / "round_2" / "state.json"
    meta = json.loads(meta_path.read_text())
    del meta["meta_sha256"]  # the checksum deleted, the round edited to 7, the folder renamed to match
    meta["round"] = 7
    meta_path.write_text(json.dumps(meta))
    (root / "round_2").rename(root / "round_7")
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(root / "round_7")
    assert latest_checkpoint(root).round == 1  # the forged one is skipped, the real one stands
    meta["meta_sha256"] = _meta_digest(
        meta
    )  # even re-signed, round 7 stands in the wrong place for its tensors
    meta_path = root / "round_7" / "state.json"
    meta_path.write_text(json.dumps(meta))
    assert (
        load_checkpoint(root / "round_7").round == 7
    )  # a consistent checkpoint: what the metrics check catches


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, object]:
    cfg = load_config(
        None, tiny_overrides(tmp_path, **{"federation.rounds": 3, "output.keep_checkpoints": 3})
    )
    result = run(cfg, tmp_path / "run", show_progress=False)
    return result.run_dir, cfg


def test_a_resume_refuses_a_checkpoint_the_metrics_never_logged(finished: tuple[Path, object]) -> None:
    run_dir, cfg = finished
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")  # round 2 gone: a gap
    with pytest.raises(
        ConfigError, match=r"does not agree with the checkpoint after round 3 \(rounds \[2\] missing"
    ):
        run(cfg, run_dir, resume=True, show_progress=False)


def test_a_resume_refuses_logged_rounds_with_their_checkpoints_gone(finished: tuple[Path, object]) -> None:
    run_dir, cfg = finished
    for n in (2, 3):
        for item in (run_dir / "checkpoints" / f"round_{n}").iterdir():
            item.unlink()
        (run_dir / "checkpoints" / f"round_{n}").rmdir()
    with pytest.raises(
        ConfigError, match="logged rounds up to 3 but its newest usable checkpoint is after round 1"
    ):
        run(cfg, run_dir, resume=True, show_progress=False)


def test_the_records_hold_the_optimizer_each_method_trains_with(tmp_path: Path) -> None:
    for strategy, optimizer in (("fedit", "adamw"), ("fedprox", "sgd"), ("fedavg", "sgd")):
        cfg = load_config(None, tiny_overrides(tmp_path, **{"strategy.name": strategy}))
        assert cfg.client.optimizer == optimizer
    explicit = load_config(
        None, tiny_overrides(tmp_path, **{"strategy.name": "fedprox", "client.optimizer": "adamw"})
    )
    assert explicit.client.optimizer == "adamw"


def no_space(*args: object, **kwargs: object) -> None:
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28): Os { code: 28, kind: StorageFull }"
    )


def test_a_full_disk_during_round_1s_checkpoint_is_one_line_and_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr("fedlora.engine.checkpoint.save_file", no_space)
        assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"fedlora: error: no space left on the device writing {run_dir}/checkpoints/round_1/"
    )
    assert "it needs about " in err and " KB, " in err and f"fedlora run --resume {run_dir}" in err, err
    assert not list((run_dir / "checkpoints").iterdir())  # no partial checkpoint left behind
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
    ]


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 48 KB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_resumable_once_space_is_freed(
    tmp_path: Path, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = small_disk / "run"
    # the adapter (32 KB) and its checkpoint do not both fit in 48 KB beside the run's records
    assert main(["run", *tiny_overrides(tmp_path), "--output", str(run_dir), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fedlora: error:") and "space" in err.lower(), err
    print(err)
    assert "Traceback" not in err
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "global" / "adapter_model.safetensors").exists()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["federation"]["rounds"] == 2


def test_export_of_a_folder_with_no_adapter_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["export", str(tmp_path / "no-such-run")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--merged", str(tmp_path / "out")]) == 2
    assert "no exported global adapter" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
