"""fedlora compare on fixture run folders."""

import json
from pathlib import Path

import pytest
import yaml

from fedlora.cli import main
from fedlora.tracking.compare import compare_runs


def fake_run(
    root: Path, name: str, strategy: str, seed: int, losses: list[float], rouge: float, force=None
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = {
        "name": name,
        "strategy": {"name": strategy, "options": {}},
        "federation": {"seed": seed, "rounds": len(losses)},
        "resources": {"force": force},
        "output": {"dir": str(run)},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for i, loss in enumerate(losses, start=1):
        record = {"round": i, "eval_loss": loss, "eval_examples": 30, "bytes_up": 1_000_000, "seconds": 2.0}
        if i == len(losses):
            record |= {"eval_rouge_l": rouge, "eval_generated": 30}
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_compare_table_groups_seeds_and_labels_differences(tmp_path: Path) -> None:
    runs = [
        fake_run(tmp_path, "a1", "flexlora", 1, [3.0, 2.0], 0.30),
        fake_run(tmp_path, "a2", "flexlora", 2, [3.0, 2.4], 0.40),
        fake_run(tmp_path, "b1", "fedit", 1, [3.0, 2.5], 0.20, force="min"),
    ]
    table = compare_runs(runs, tmp_path / "out")
    lines = table.splitlines()
    assert lines[0] == (
        "| method | runs (seeds) | held-out loss | ROUGE-L | held-out loss 95% CI | examples | MB up | MB down "
        "| s / round | server s / round |"
    )
    flex = next(line for line in lines if line.startswith("| flexlora"))
    # mean of 2.0 and 2.4 = 2.2, sample std = 0.2828; ROUGE-L mean 0.35, std 0.0707
    # 95% CI: 2.2 -+ t(0.975, 1) 0.2828 / sqrt(2) = 2.2 -+ 12.7062 x 0.2
    assert "| 2 (1,2) | 2.2000 ± 0.2828 | 0.3500 ± 0.0707 | [-0.3412, 4.7412] | 30 | 2.0 |" in flex
    assert flex.startswith("| flexlora resources.force=null")
    fedit = next(line for line in lines if line.startswith("| fedit resources.force=min"))
    assert "| 1 (1) | 2.5000 | 0.2000 |" in fedit
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert [g["method"].split()[0] for g in saved] == ["flexlora", "fedit"]


def test_final_only_metrics_are_bars_and_benchmarks_join_the_table(tmp_path: Path) -> None:
    """ROUGE-L, evaluated after the last round only, is a bar panel (with its interval), not a one-point line;
    the held-out loss per round is a curve and also a curve against the megabytes sent; a run's
    eval/tasks.json adds its benchmark accuracies to the table and to the bars."""
    from fedlora.tracking.compare import RunSummary, bar_interval, figure_panels, group_runs, group_styles

    runs = [
        fake_run(tmp_path, "a1", "flexlora", 1, [3.0, 2.0], 0.30),
        fake_run(tmp_path, "a2", "flexlora", 2, [3.0, 2.4], 0.40),
        fake_run(tmp_path, "b1", "fedit", 1, [3.0, 2.5], 0.20),
    ]
    for run, acc in zip(runs, (0.30, 0.40, 0.25), strict=True):
        (run / "eval").mkdir()
        task = {"source": "x", "split": "test", "n": 200, "num_fewshot": 0}
        task["adapter"] = {"acc": acc, "acc_stderr": 0.03, "items_per_second": 2.0}
        (run / "eval" / "tasks.json").write_text(json.dumps({"tasks": {"mmlu": task}}))
    groups = group_runs([RunSummary.load(r) for r in runs])
    assert figure_panels(groups) == [
        ("curve", "eval_loss"),
        ("loss_vs_mb", "eval_loss"),
        ("bars", "eval_rouge_l"),
        ("bars", "task_mmlu_acc"),
    ]
    # two seeds: the t interval of the mean, 0.35 -+ 12.706 x 0.0707 / sqrt(2); one run of a benchmark: its
    # items' 0.25 -+ 1.96 x 0.03; one run's ROUGE-L: no interval
    low, high = bar_interval(groups[0], "task_mmlu_acc")
    assert (low, high) == (
        pytest.approx(0.35 - 12.7062 * 0.05, abs=1e-3),
        pytest.approx(0.35 + 12.7062 * 0.05, abs=1e-3),
    )
    assert bar_interval(groups[1], "task_mmlu_acc") == (
        pytest.approx(0.25 - 0.0588),
        pytest.approx(0.25 + 0.0588),
    )
    assert bar_interval(groups[1], "eval_rouge_l") is None
    table = compare_runs(runs, tmp_path / "out")
    assert "| mmlu acc (items) |" in table.splitlines()[0]
    assert "| 0.3500 ± 0.0707 (200) |" in table and "| 0.2500 (200) |" in table
    assert (tmp_path / "out" / "compare.png").stat().st_size > 1000
    # one curve per round when a metric is evaluated in several rounds: ROUGE-L every round is a curve
    every_round = fake_run(tmp_path / "more", "c1", "fedit", 1, [3.0, 2.5], 0.2)
    lines = [json.loads(x) for x in (every_round / "metrics.jsonl").read_text().splitlines()]
    lines[0] |= {"eval_rouge_l": 0.1, "eval_generated": 30}
    (every_round / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert ("curve", "eval_rouge_l") in figure_panels(group_runs([RunSummary.load(every_round)]))
    # 40 groups, no two drawn alike (colour, marker and line style together)
    styles = group_styles(40, [f"C{i}" for i in range(10)])
    assert len(set(styles)) == 40


def test_compare_takes_a_sweep_folder_and_labels_by_what_differs(tmp_path: Path) -> None:
    """A folder of runs stands for its runs; a method's own options (one value per method) are not
    repeated in the labels, an option that differs within a method is."""
    sweep = tmp_path / "sweep"
    for i, (strategy, options) in enumerate(
        [
            ("fedit", {}),
            ("flexlora", {"svd_rank": 8}),
            ("flexlora", {"svd_rank": 8}),
            ("fedprox", {"mu": 0.01}),
        ]
    ):
        run = fake_run(sweep, f"r{i}", strategy, i, [3.0, 2.0 + i / 10], 0.3)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["strategy"]["options"] = options
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    table = compare_runs([sweep])
    rows = [line.split(" | ")[0].strip("| ") for line in table.splitlines()[2:]]
    assert rows == ["fedit", "flexlora", "fedprox"]
    run = sweep / "r3"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["strategy"]["options"] = {"mu": 0.1}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    fake_run(sweep, "r4", "fedprox", 4, [3.0, 2.0], 0.3)
    (sweep / "r4" / "config.yaml").write_text(
        yaml.safe_dump({**cfg, "strategy": {"name": "fedprox", "options": {"mu": 0.01}}})
    )
    labels = [line.split(" | ")[0].strip("| ") for line in compare_runs([sweep]).splitlines()[2:]]
    assert "fedprox strategy.options.mu=0.1" in labels and "fedprox strategy.options.mu=0.01" in labels


def test_compare_cli_rejects_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["compare", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_sweep_grid_splits_values_outside_brackets() -> None:
    from fedlora.sweep import grid, parse_axes, split_values

    assert split_values("a,b,[c, d],{x: 1, y: 2}") == ["a", "b", "[c, d]", "{x: 1, y: 2}"]
    cells = grid(parse_axes(["strategy.name=fedit,flexlora", "adapter.rank=2,4"]), [1, 2])
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    seeds = ("federation.seed=1", "data.seed=1", "adapter.init_seed=1", "faults.seed=1")
    assert cells[0].overrides == ("strategy.name=fedit", "adapter.rank=2", *seeds)  # every seed varies
    assert cells[0].name == "name-fedit_rank-2_seed-1"  # readable: no '=' or ','
    only = grid(parse_axes(["data.seed=3", "federation.seed=4"]), [1], ("federation.seed",))
    assert only[0].name == "data-seed-3_federation-seed-4_seed-1"
    assert only[0].overrides == ("data.seed=3", "federation.seed=4")  # the grid's own seed values stand
    # an options mapping reads as its first characters and a digest: short folder names, never shared
    long = grid(
        parse_axes(
            ["strategy.options={eps: 1.0e-3, lr_strategy: five-round},{eps: 1.0e-3, lr_strategy: model-diff}"]
        ),
        [1],
    )
    assert [len(c.name) for c in long] == [48, 48] and long[0].name != long[1].name
    assert long[0].name.startswith("options-eps-1.0e-3-lr-strategy") and long[0].name.endswith("_seed-1")


def test_sweep_runs_the_grid_and_compares(tmp_path: Path, capsys) -> None:
    from conftest import tiny_overrides

    overrides = tiny_overrides(tmp_path, **{"federation.rounds": 1})
    args = ["sweep", *overrides, "--seeds", "1,2", "--set", "strategy.name=fedit,fedavg"]
    assert main([*args, "--output", str(tmp_path / "sweep"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    # the records hold each method's optimizer (fedit: AdamW, fedavg: SGD), so the labels say they differ
    assert (
        "| fedit client.optimizer=adamw | 2 (1,2) |" in out
        and "| fedavg client.optimizer=sgd | 2 (1,2) |" in out
    )
    assert len(list((tmp_path / "sweep").glob("*/global/adapter_model.safetensors"))) == 4
    index = json.loads((tmp_path / "sweep" / "sweep.json").read_text())  # what each folder holds
    assert {c["folder"] for c in index["cells"]} == {
        p.parent.name for p in (tmp_path / "sweep").glob("*/config.yaml")
    }
    assert ["strategy.name=fedavg" in c["overrides"] for c in index["cells"]] == [False, False, True, True]
    assert (tmp_path / "sweep" / "compare.png").exists()


def test_tensorboard_event_files_hold_the_round_metrics(tmp_path: Path) -> None:
    import struct

    from tensorboardX.proto.event_pb2 import Event

    from conftest import tiny_overrides

    run_dir = tmp_path / "tb"
    overrides = tiny_overrides(tmp_path, **{"output.tensorboard": "true"})
    assert main(["run", *overrides, "--output", str(run_dir), "--no-progress"]) == 0
    scalars: dict[str, dict[int, float]] = {}
    for path in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    texts = []
    for path in (run_dir / "tensorboard").rglob("events.out.tfevents.*"):
        texts.append(path.read_bytes())
    everything = b"".join(texts)
    assert b"client.lr" in everything and b"_hparams_/session_start_info" in everything  # HPARAMS tab
    assert b"federation:" in everything  # the config as text
    for record in records:
        assert scalars["eval_loss"][record["round"]] == pytest.approx(record["eval_loss"], rel=1e-6)
        assert scalars["bytes_up"][record["round"]] == pytest.approx(record["bytes_up"])


def test_median_curve_follows_the_middle_seed_not_a_diverged_one() -> None:
    from fedlora.tracking.compare import median_curve

    steady, diverged, other = (
        [(1.0, 3.0), (2.0, 2.5), (3.0, 2.0)],
        [(1.0, 3.1), (2.0, 20.0), (3.0, 25.0)],
        [(1.0, 2.9), (2.0, 2.6), (3.0, 2.2)],
    )
    assert median_curve([steady, diverged, other]) == [(1.0, 3.0), (2.0, 2.6), (3.0, 2.2)]
    # a run that stopped early: only the points that every run reached
    assert median_curve([steady, other[:2], []]) == [(1.0, pytest.approx(2.95)), (2.0, pytest.approx(2.55))]


def test_compare_labels_show_the_optimizer_each_method_trained_with(tmp_path: Path) -> None:
    """fedit trains with AdamW, fedprox with SGD: the records hold the effective optimizer (written by the
    preflight), so a comparison of the two says it compares optimizers too."""
    from fedlora.config.loader import config_text
    from fedlora.preflight import config_from_dict
    from fedlora.tracking.compare import RunSummary, differing_keys, label

    runs = []
    for method in ("fedit", "fedprox"):
        run = fake_run(tmp_path, method, method, 0, [3.0, 2.0], 0.3)
        cfg = config_from_dict({"name": method, "strategy": {"name": method}, "output": {"dir": str(run)}})
        (run / "config.yaml").write_text(config_text(cfg))
        runs.append(RunSummary.load(run))
    keys = differing_keys(runs)
    assert "client.optimizer" in keys
    assert [label(r, keys) for r in runs] == ["fedit client.optimizer=adamw", "fedprox client.optimizer=sgd"]
