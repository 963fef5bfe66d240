from pathlib import Path

from rich.console import Console

from fedlora.tracking.metrics import MetricsLog
from fedlora.tracking.report import plot_curves, rows_for_one_screen, summary_table


def records(n: int) -> list[dict]:
    return [
        {
            "round": r,
            "train_loss": 1.0 / r,
            "eval_loss": 2.0 / r,
            "num_clients": 2,
            "bytes_up": 10,
            "bytes_down": 10,
            "seconds": 0.1,
        }
        for r in range(1, n + 1)
    ]


def test_metrics_log_append_truncate_and_cut_line(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in records(4):
        log.append(r)
    assert [r["round"] for r in log.truncate_after(2)] == [1, 2]
    with log.path.open("a") as f:
        f.write('{"round": 3, "train_lo')  # a line cut by a crash
    assert [r["round"] for r in log.read()] == [1, 2]
    log.append({"round": 9, "x": float("nan")})
    assert log.path.read_text().splitlines()[-1] == '{"round": 9, "x": null}'
    assert [r["round"] for r in log.read()] == [1, 2, 9]


def test_summary_fits_one_screen_and_keeps_first_and_last() -> None:
    rows = rows_for_one_screen(records(100))
    assert len(rows) == 16 and rows[0]["round"] == 1 and rows[-1]["round"] == 100
    assert rows_for_one_screen(records(5)) == records(5)
    console = Console(width=120, record=True)
    console.print(summary_table(records(100), "t"))
    assert len(console.export_text().splitlines()) < 25


def test_plot_curves_writes_png(tmp_path: Path) -> None:
    path = plot_curves(records(3), tmp_path / "c.png", "t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_every_logging_steps_and_the_learning_rate_per_round(tmp_path) -> None:
    """metrics.jsonl holds each round's learning rate (here FlowerTune's cosine across rounds), the
    throughput, and the training loss every output.logging_steps optimizer steps, counted over the run: the
    mean over the clients of each step's loss, windowed."""
    import json
    import math

    import pytest

    from conftest import tiny_overrides
    from fedlora import load_config
    from fedlora.runner import run_experiment

    rounds, steps, every, lr, lr_min = 3, 5, 2, 1e-3, 1e-4
    extra = {
        "federation.rounds": rounds,
        "client.local_steps": steps,
        "client.lr": lr,
        "client.lr_min": lr_min,
        "output.logging_steps": every,
    }
    run_experiment(load_config(None, tiny_overrides(tmp_path, **extra)), tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for t, record in enumerate(records, start=1):
        cosine = lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / rounds))
        assert record["learning_rate"] == pytest.approx(cosine)
        assert record["train_tokens_per_second"] > 0
        per_client = [c["step_losses"] for c in record["clients"]]
        mean = [sum(c[s] for c in per_client) / len(per_client) for s in range(steps)]
        windows = [mean[i : i + every] for i in range(0, steps, every)]
        offset = (t - 1) * steps
        expected = [[offset + min(i * every + every, steps), sum(w) / len(w)] for i, w in enumerate(windows)]
        assert [s for s, _ in record["loss_steps"]] == [s for s, _ in expected]
        assert [v for _, v in record["loss_steps"]] == pytest.approx([v for _, v in expected])
        assert record["train_loss"] == pytest.approx(sum(mean) / steps)  # equal-sized clients
