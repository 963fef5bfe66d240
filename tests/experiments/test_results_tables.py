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

SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "results_tables.py"


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
    # a same-seed difference pairs finished runs, or runs at the same round: seed 2's unfinished standalone run
    # (round 2) is not paired with pFedLoRA's finished one (round 3), so the difference is over seeds 0 and 1,
    # and says so
    diffs = [standalone[s] - mine[s] for s in (0, 1)]
    half = t.ppf(0.975, 1) * statistics.stdev(diffs) / 2**0.5
    mean = statistics.fmean(diffs)
    assert rows["standalone"][10] == f"{mean:+.3f} [{mean - half:.3f}, {mean + half:.3f}], 2 seeds"
    # client compute: the adapter's and the local model's seconds, summed over rounds
    assert rows["pFedLoRA"][6].startswith("9 ")
    assert (tmp_path / "results-pfedlora.png").stat().st_size > 0


def write_flexlora_run(path: Path, seed: int, loss: float, rouge: float, ranks: list[int]) -> None:
    write_run(path, seed, [0.0], 1.0)
    record = {"round": 1, "eval_loss": loss, "eval_rouge_l": rouge}
    (path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    (path / "clients.json").write_text(
        json.dumps([{"client": i, "rank": f"r{r}"} for i, r in enumerate(ranks)])
    )


def test_flexlora_gain_trend_is_the_per_seed_least_squares_slope(tables, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ranks = {
        "heavy-tail-light": [2, 2, 2, 50],
        "uniform": [2, 8, 8, 50],
        "heavy-tail-strong": [8, 50, 50, 50],
    }
    gains = {  # FlexLoRA minus bucket loss, per seed and distribution
        0: {"heavy-tail-light": -0.01, "uniform": -0.03, "heavy-tail-strong": -0.08},
        1: {"heavy-tail-light": 0.00, "uniform": -0.05, "heavy-tail-strong": -0.06},
        2: {"heavy-tail-light": -0.02, "uniform": -0.02, "heavy-tail-strong": -0.09},
    }
    bucket = {0: 2.70, 1: 2.60, 2: 2.65}
    for seed in bucket:
        write_flexlora_run(tmp_path / "fedit-min" / f"seed-{seed}", seed, bucket[seed], 0.1, [2] * 4)
        (tmp_path / f"base-model_seed-{seed}.json").write_text(
            json.dumps({"eval_loss": 3.3 + seed / 100, "eval_rouge_l": 0.06})
        )
        for distribution, gain in gains[seed].items():
            write_flexlora_run(
                tmp_path / "flexlora" / f"distribution-{distribution}_seed-{seed}",
                seed,
                bucket[seed] + gain,
                0.2,
                ranks[distribution],
            )
    runs = {d: tables.load(tmp_path, f"flexlora/distribution-{d}_seed-*") for d in ranks}
    slopes = tables.gain_trend(runs, tables.load(tmp_path, "fedit-min/*"), tables.last("eval_loss"))

    xs = [statistics.fmean(ranks[d]) for d in ranks]
    x_mean = statistics.fmean(xs)
    expected = []
    for seed in sorted(gains):
        ys = [gains[seed][d] for d in ranks]
        y_mean = statistics.fmean(ys)
        expected.append(
            sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
            / sum((x - x_mean) ** 2 for x in xs)
        )
    assert sorted(slopes) == pytest.approx(sorted(expected), rel=1e-9)
    assert all(s < 0 for s in slopes)  # these gains grow with the mean rank

    text = tables.flexlora(tmp_path)
    # the base model's row, and the bucket minus it on the same seed (2.70 - 3.30, 2.60 - 3.31, 2.65 - 3.32)
    moved = [bucket[s] - (3.3 + s / 100) for s in bucket]
    assert f"same seed: {statistics.fmean(moved):+.3f}" in text
    assert "| `heavy-tail-strong` | 39.5 |" in text


def test_rounds_to_flatten(tables) -> None:  # type: ignore[no-untyped-def]
    assert tables.rounds_to_flatten([3.0, 2.8, 2.6, 2.59, 2.585, 2.588, 2.583, 2.584]) == 3
    assert tables.rounds_to_flatten([3.0, 2.8, 2.6, 2.4, 2.2, 2.0]) is None


def write_rounds(
    path: Path,
    seed: int,
    losses: list[float],
    clients: list[dict],
    per_round: list[list[dict]] | None = None,
    options: dict | None = None,
) -> None:
    """A finished run: one record per round with ``eval_loss`` and the same ``clients`` entries every round
    (or round t's ``per_round[t - 1]``); ``options``: its ``strategy.options``."""
    path.mkdir(parents=True)
    config = {"federation": {"seed": seed, "rounds": len(losses)}}
    if options is not None:
        config["strategy"] = {"name": "fedmezo", "options": options}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {"round": i + 1, "eval_loss": loss, "clients": per_round[i] if per_round else clients}
        for i, loss in enumerate(losses)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "global").mkdir()


def test_fedmezo_compares_methods_at_equal_client_compute(tables, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    zeroth = [{"client": c, "forward_passes": 40, "train_seconds": 2.0} for c in range(4)]  # 0.16e3 a round
    first = [{"client": c, "steps": 20, "train_seconds": 2.5} for c in range(4)]  # 3 per step: 0.24e3 a round
    mezo = {s: [3.0, 2.5, 2.7 + s / 100, 2.4, 2.6] for s in range(3)}  # rises 0.2 + s/100 and 0.2
    sgd = {s: [3.0, 2.8, 2.6 - s / 100, 2.2, 2.0] for s in range(3)}
    for s in range(3):
        # the folders of a sweep of strategy.options; which rule a run used is read from its config
        rule = {"eps": 1.0e-3, "lr_strategy": "frozen", "lr_rules": "reference", "upload": "seeds"}
        write_rounds(tmp_path / "fedmezo" / f"options-a1_seed-{s}", s, mezo[s], zeroth, options=rule)
        write_rounds(tmp_path / "fedavg-sgd" / f"seed-{s}", s, sgd[s], first)
        (tmp_path / f"base-model_seed-{s}.json").write_text(json.dumps({"eval_loss": 3.5}))
    # another rule's run on seed 0, made on a machine twice as fast: the same forward passes in half the seconds
    faster = [{**c, "train_seconds": 1.0} for c in zeroth]
    five_round = [3.0, 2.45, 2.35, 2.3, 2.25]
    five = {"lr_strategy": "five-round", "lr_rules": "reference", "upload": "seeds"}
    write_rounds(tmp_path / "fedmezo" / "options-b2_seed-0", 0, five_round, faster, options=five)
    # a run on seed 1 that lost 3 of round 2's clients (a stop or a crash): 0.68e3 in all. It moves the shared
    # budget of the held-out loss column, not the other pairs' differences
    short = [[*zeroth] for _ in range(5)]
    short[1] = zeroth[:1]
    random_rule = {"lr_strategy": "random", "lr_rules": "reference", "upload": "seeds"}
    write_rounds(
        tmp_path / "fedmezo" / "options-c3_seed-1",
        1,
        [3.0, 2.9, 2.8, 2.7, 2.6],
        zeroth,
        per_round=short,
        options=random_rule,
    )
    text = tables.fedmezo(tmp_path)
    rows = {
        line.split(" | ")[0].strip("| "): line.split(" | ")
        for line in text.splitlines()
        if line.startswith("| ")
    }
    # the shared budget is the short run's 0.68e3: SGD (0.24e3 a round) is read there at round 2
    assert "Equal client compute: 0.68e3" in text
    at_budget = [sgd[s][1] for s in range(3)]
    assert rows["FedAvg SGD (matched)"][4] == tables.format_mean_std(at_budget, 3)
    # the pair's budget is frozen's whole compute, 5 x 0.16 = 0.8e3: SGD has spent 0.72e3 after round 3, 0.96e3
    # after round 4, so it is compared at round 3
    diffs = [sgd[s][2] - mezo[s][4] for s in range(3)]
    assert rows["FedAvg SGD (matched)"][15].startswith(f"{statistics.fmean(diffs):+.3f} [")
    # the short run against frozen on seed 1: its own 0.68e3, frozen read after round 4 (0.64e3)
    assert rows["FedMeZO random"][15] == f"{2.6 - mezo[1][3]:+.3f} -"
    # equal measured seconds, a budget per same-seed pair: MeZO's 5 x 4 x 2 s = 40 s against SGD's 50 s, so SGD
    # is read at round 4 (10 s a round); the faster machine's five-round run (20 s) does not move that budget
    seconds_diffs = [sgd[s][3] - mezo[s][4] for s in range(3)]
    assert rows["FedAvg SGD (matched)"][16].startswith(f"{statistics.fmean(seconds_diffs):+.3f} [")
    # five-round against frozen on seed 0: the pair's budget is five-round's 20 s, frozen's round 2 (16 s)
    assert rows["FedMeZO five-round"][16] == f"{five_round[4] - mezo[0][1]:+.3f} -"
    # how much each curve goes back up, summed over rounds
    rises = [0.2 + s / 100 + 0.2 for s in range(3)]
    assert rows["FedMeZO frozen"][6] == tables.format_mean_std(rises, 3)
    assert rows["FedAvg SGD (matched)"][6].startswith("0.000")
    assert rows["FedMeZO frozen"][10].startswith("40 ")  # measured client seconds: 5 rounds x 4 clients x 2 s
    assert f"FedMeZO frozen minus base model, same seed: {2.6 - 3.5:+.3f}" in text
    assert "FedAvg SGD (matched) not flat, not flat, not flat" in text
    assert (tmp_path / "results-fedmezo-compute.png").stat().st_size > 0


def write_accuracy_run(
    path: Path, seed: int, lr: float, accuracy: float, epsilon: float | None = None
) -> None:
    """A finished classification run of 2 rounds ending at ``accuracy`` (macro-F1 10 points lower)."""
    path.mkdir(parents=True)
    config = {"federation": {"seed": seed, "rounds": 2}, "client": {"lr": lr}}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = [
        {"round": r, "eval_accuracy": a, "eval_macro_f1": a - 0.1, "eval_loss": 1 - a, "epsilon_max": epsilon}
        for r, a in ((1, 0.3), (2, accuracy))
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (path / "global").mkdir()


def test_ffa_table_pairs_ffa_with_lora_per_epsilon_and_reports_the_rate_sweeps(
    tables, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    grid, gate, no_dp = tmp_path / "ffa-dp-grid", tmp_path / "ffa-dp-gate", tmp_path / "ffa-nodp"
    lora = {1: 0.90, 2: 0.86, 3: 0.80}
    ffa = {1: 0.92, 2: 0.91, 3: 0.90}
    for seed in lora:
        write_accuracy_run(grid / "lora-eps6" / f"seed-{seed}", seed, 0.2, lora[seed], epsilon=5.9)
        write_accuracy_run(grid / "ffa-eps6" / f"seed-{seed}", seed, 0.5, ffa[seed], epsilon=5.9)
    write_accuracy_run(grid / "ffa-eps3" / "seed-1", 1, 0.5, 0.7, epsilon=2.9)  # LoRA's epsilon 3 not run yet
    for lr, accuracy in ((0.05, 0.43), (0.2, 0.907), (0.5, 0.263)):
        write_accuracy_run(gate / "lora-eps6" / f"lr-{lr}_seed-1", 1, lr, accuracy, epsilon=5.9)
    for lr, accuracy in ((0.2, 0.893), (0.5, 0.917)):
        write_accuracy_run(grid / "ffa-tune" / f"lr-{lr}_seed-1", 1, lr, accuracy, epsilon=5.9)
    for seed in (1, 2):
        write_accuracy_run(no_dp / "lora" / f"seed-{seed}", seed, 5e-3, 0.92)
        write_accuracy_run(no_dp / "ffa" / f"seed-{seed}", seed, 1e-2, 0.91 + 0.01 * seed)

    text = tables.ffa(grid)
    assert "LoRA: lr 0.05 43.0%, lr 0.2 90.7%, lr 0.5 26.3%; FFA-LoRA: lr 0.2 89.3%, lr 0.5 91.7%" in text
    blocks: dict[str, list[list[str]]] = {}
    heading = None
    for line in text.splitlines():
        if line.startswith(("epsilon", "Without DP")):
            heading = line.rstrip(":") if line.startswith("epsilon") else None
            blocks.update({heading: []} if heading else {})
        elif line.startswith("| ") and heading:
            blocks[heading].append(line.split(" | "))
    assert list(blocks) == ["epsilon 6", "epsilon 3"]  # the largest epsilon first
    epsilon_6 = {row[0].strip("| "): row for row in blocks["epsilon 6"]}
    diffs = [ffa[s] - lora[s] for s in lora]
    half = t.ppf(0.975, 2) * statistics.stdev(diffs) / 3**0.5
    mean = statistics.fmean(diffs)
    assert epsilon_6["FFA-LoRA"][10] == f"{mean:+.3f} [{mean - half:.3f}, {mean + half:.3f}]"
    assert epsilon_6["FFA-LoRA"][12].startswith(f"{-mean:+.3f} [")  # loss = 1 - accuracy here
    assert (
        epsilon_6["LoRA (FedIT)"][2]
        == f"{statistics.fmean(lora.values()):.3f} ± {statistics.stdev(lora.values()):.3f}"
    )
    assert epsilon_6["LoRA (FedIT)"][8] == "5.90 ± 0.00"
    # epsilon 3: FFA-LoRA alone, nothing to pair it with
    epsilon_3 = {row[0].strip("| "): row for row in blocks["epsilon 3"]}
    assert list(epsilon_3)[1:] == ["FFA-LoRA"] and epsilon_3["FFA-LoRA"][10] == "-"
    # without DP: each method at its own rate, paired on the same seed (FFA minus LoRA: +0.00, +0.01 over 2
    # seeds, t with 1 degree of freedom); no rate sweep recorded, so no rates are named
    without = text.split("Without DP", 1)[1]
    assert "tuned on seed 1: -" in without
    row = next(line for line in without.splitlines() if line.startswith("| FFA-LoRA"))
    half = t.ppf(0.975, 1) * statistics.stdev([0.0, 0.01]) / 2**0.5
    assert row.split(" | ")[8] == f"+0.005 [{0.005 - half:.3f}, {0.005 + half:.3f}]"
