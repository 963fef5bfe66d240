"""The run folder: one process at a time, resumes that cannot change what was trained, records that are
written whole, damage refused with the reason, signals that stop cleanly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from fedlora.cli import main
from fedlora.compute import describe_machine
from fedlora.config.loader import ConfigError
from fedlora.engine.run_folder import run_lock


def finished_run(tmp_path: Path, rounds: int = 2) -> Path:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": rounds})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    return run_dir


@pytest.mark.parametrize(
    "override",
    [
        "strategy.name=fedprox",
        "strategy.name=flexlora",
        "adapter.rank=8",
        "adapter.alpha=32",
        "data.tasks=[gcd]",
        "federation.seed=5",
        "client.lr=0.1",
        "privacy={enabled: true, noise_multiplier: 1.0}",
    ],
)
def test_resume_refuses_changes_to_what_is_trained(
    tmp_path: Path, override: str, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = finished_run(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    assert main(["run", "--resume", str(run_dir), override, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "a resume cannot change what was trained" in err and override.split("=")[0] in err
    assert (run_dir / "config.yaml").read_bytes() == before  # never rewritten
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0  # a plain resume still works


def test_resume_allows_more_rounds_and_records_it(tmp_path: Path) -> None:
    """After ``--resume RUN federation.rounds=3``, config.yaml is the effective config (the first one kept
    as config.original.yaml): a plain resume, eval and compare read 3 rounds."""
    from fedlora.tracking.compare import RunSummary

    run_dir = finished_run(tmp_path)
    before = (run_dir / "config.yaml").read_bytes()
    assert main(["run", "--resume", str(run_dir), "federation.rounds=3", "--no-progress"]) == 0
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3] and (run_dir / "config.original.yaml").read_bytes() == before
    assert "rounds: 3" in (run_dir / "config.yaml").read_text()
    info = json.loads((run_dir / "run.json").read_text())
    [resume] = info["resumes"]
    assert resume["from_round"] == 3 and resume["changes"] == {"federation.rounds": 3}
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0  # plain: nothing left to do
    assert main(["run", "--resume", str(run_dir), "federation.rounds=4", "--no-progress"]) == 0
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    assert RunSummary.load(run_dir).settings["federation.rounds"] == 4
    info = json.loads((run_dir / "run.json").read_text())
    # the machine of the first start and of the resume, so that each round's seconds can be traced to one
    assert info["machines"][:2] == [
        {"from_round": 1, **describe_machine(torch.device("cpu"))},
        {"from_round": 3, **describe_machine(torch.device("cpu"))},
    ]
    assert info["machines"][0]["cpu"] and info["machines"][0]["cores"] >= 1


def test_damaged_or_edited_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = finished_run(tmp_path)
    config = run_dir / "config.yaml"
    text = config.read_text()
    config.write_text("")
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 2
    assert "is empty (damaged)" in capsys.readouterr().err
    config.write_text(text.replace("lr: 0.001", "lr: 0.002"))
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 2
    assert "does not match the checksum" in capsys.readouterr().err
    assert main(["eval", str(run_dir)]) == 2


def test_tampered_checkpoints_are_not_believed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = finished_run(tmp_path, rounds=2)
    newest = run_dir / "checkpoints" / "round_2" / "state.json"
    meta = json.loads(newest.read_text())
    newest.write_text(json.dumps({**meta, "round": 9}))  # a tampered round number
    assert main(["run", "--resume", str(run_dir), "federation.rounds=3", "--no-progress"]) == 0
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]  # resumed from the intact round 1 (round 2 replayed), not from "round 9"
    for state in (run_dir / "checkpoints").glob("round_*/state.json"):
        state.write_text(state.read_text().replace('"round"', '"round" ', 1).replace("1", "7", 1))
    assert main(["run", "--resume", str(run_dir), "federation.rounds=4", "--no-progress"]) == 2
    assert "cannot resume exactly" in capsys.readouterr().err


def test_one_process_per_run_folder(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    with run_lock(folder):
        with pytest.raises(ConfigError, match=f"in use by process {os.getpid()}"), run_lock(folder):
            pass
        other = subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "run", *tiny_overrides(tmp_path), "--output", str(folder)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert other.returncode == 2 and f"in use by process {os.getpid()}" in other.stderr
    with run_lock(folder):  # released with its holder
        pass


def test_a_failed_export_leaves_the_previous_global_adapter(tmp_path: Path, monkeypatch) -> None:
    run_dir = finished_run(tmp_path, rounds=1)
    adapter = run_dir / "global" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    from fedlora.session import export

    def half_export(
        adapters, state, folder, base, *named
    ):  # writes part of the folder, then the disk fills up
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(28, "No space left on device", str(folder))

    monkeypatch.setattr(export, "export_peft_adapter", half_export)
    assert main(["run", "--resume", str(run_dir), "federation.rounds=2", "--no-progress"]) == 2
    assert adapter.read_bytes() == before  # the finished export is still whole


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_cleanly_and_the_run_resumes(tmp_path: Path, signum: int) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 300, "client.local_steps": 30})
    process = subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "run", *overrides, "--output", str(run_dir), "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.2)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-2000:]
    assert "Resume with: fedlora run --resume" in err and "Traceback" not in err
    done = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert done and done == list(range(1, len(done) + 1)) and len(done) < 300
    assert main(["run", "--resume", str(run_dir), f"federation.rounds={len(done) + 1}", "--no-progress"]) == 0


@pytest.mark.parametrize("after_s", [0.5, 1.5, 3.0])
def test_a_signal_while_the_libraries_load_is_a_clean_stop(tmp_path: Path, after_s: float) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedlora.cli",
            "run",
            *tiny_overrides(tmp_path),
            "--output",
            str(tmp_path / "r"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(after_s)  # importing torch and transformers takes seconds: land in different imports
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-2000:]
