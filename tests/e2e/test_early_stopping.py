"""Early stopping at the server, the best round's adapter in best/, adapters every N rounds, exact resume."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from fedlora import load_config
from fedlora.engine.early_stopping import EarlyStopping
from fedlora.runner import run


def test_patience_counts_evaluated_rounds_without_improvement() -> None:
    records = [
        {"round": 1, "eval_loss": 3.0},
        {"round": 2},
        {"round": 3, "eval_loss": 2.5},
        {"round": 4, "eval_loss": 2.6},
        {"round": 5, "eval_loss": 2.55},
    ]
    state = EarlyStopping.from_records("eval_loss", 2, records)
    assert (state.best, state.best_round, state.since_best, state.should_stop) == (2.5, 3, 2, True)
    higher = EarlyStopping.from_records(
        "eval_accuracy", 3, [{"round": 1, "eval_accuracy": 0.5}, {"round": 2, "eval_accuracy": 0.7}]
    )
    assert (higher.best_round, higher.should_stop) == (2, False)


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_a_diverging_run_stops_early_and_keeps_its_best_round(tmp_path: Path) -> None:
    options = {
        "federation.rounds": 10,
        "client.lr": 3.0,  # far too high: the held-out loss soon stops improving
        "eval.early_stopping_patience": 2,
        "output.save_every": 1,
    }
    result = run(load_config(None, tiny_overrides(tmp_path, **options)), tmp_path / "r", show_progress=False)
    rounds = [r["round"] for r in result.records]
    losses = [r["eval_loss"] for r in result.records]
    best = rounds[losses.index(min(losses))]
    assert len(rounds) < 10 and rounds[-1] == best + 2  # stopped two evaluated rounds after the best
    saved = adapter(tmp_path / "r" / "best")
    for key, value in adapter(tmp_path / "r" / "adapters" / f"round_{best}").items():
        assert torch.equal(saved[key], value)
    assert sorted(p.name for p in (tmp_path / "r" / "adapters").iterdir()) == sorted(
        f"round_{r}" for r in rounds
    )
    # a resume of the stopped run stops again at once (its state comes from the records), nothing changes
    again = run(
        load_config(None, tiny_overrides(tmp_path, **options)),
        tmp_path / "r",
        resume=True,
        show_progress=False,
    )
    assert [r["round"] for r in again.records] == rounds
