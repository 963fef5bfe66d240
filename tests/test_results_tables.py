"""experiments/results_tables.py, which makes docs/results.md's tables: paired differences and intervals
against a direct computation on run folders written here."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml
from scipy.stats import t

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "results_tables.py"


@pytest.fixture(scope="module")
def tables():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("results_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def write_run(path: Path, seed: int, accuracies: list[float], seconds: float, finished: bool = True) -> None:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"federation": {"seed": seed, "rounds": 3}}))
    records = [
        {
            "round": i + 1,
            "eval_loss": 2.0 - a,
            "eval_client_accuracy_mean": a,
            "bytes_up": 100,
            "bytes_down": 200,
            "clients": [{"client": 0, "train_seconds": seconds, "local_model_seconds": 1.0, "steps": 5}],
        }
        for i, a in enumerate(accuracies)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (path / "global").mkdir()


def test_pfedlora_table_pairs_seeds_and_reports_t_intervals(tables, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(
        tables, "majority_baseline", lambda run: 0.5
    )  # builds the run's data: not these folders
    mine = {0: 0.70, 1: 0.80, 2: 0.75}
    standalone = {0: 0.60, 1: 0.78, 2: 0.74}
    for seed in mine:
        write_run(
            tmp_path / "heterogeneous" / f"options-federate-true_seed-{seed}",
            seed,
            [0.5, 0.6, mine[seed]],
            2.0,
        )
        write_run(
            tmp_path / "heterogeneous" / f"options-federate-false_seed-{seed}",
            seed,
            [0.5, standalone[seed]],
            2.0,
            finished=seed != 2,
        )
    text = tables.pfedlora(tmp_path)
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| ")
    }

    values = list(mine.values())
    half = t.ppf(0.975, 2) * statistics.stdev(values) / 3**0.5
    mean = statistics.fmean(values)
    assert rows["pFedLoRA"][1] == "3/3"
    assert rows["pFedLoRA"][2] == f"{mean:.3f} ± {statistics.stdev(values):.3f}"
    assert rows["pFedLoRA"][3] == f"[{mean - half:.3f}, {mean + half:.3f}]"
    # the standalone run of seed 2 stopped after 2 of 3 rounds: counted as far as it got, and marked
    assert rows["standalone"][1] == "2/3 (2-2 of 3 rounds)"
    diffs = [standalone[s] - mine[s] for s in mine]
    half = t.ppf(0.975, 2) * statistics.stdev(diffs) / 3**0.5
    assert f"{statistics.fmean(diffs):+.3f} [{statistics.fmean(diffs) - half:.3f}" in rows["standalone"][10]
    # client compute: the adapter's and the local model's seconds, summed over rounds
    assert rows["pFedLoRA"][6].startswith("9 ")
    assert (tmp_path / "results-pfedlora.png").stat().st_size > 0
