"""The tables of docs/results.md from the runs of the claim experiments, one section per claim:

    python experiments/results_tables.py pfedlora [runs/pfedlora-widths]
    python experiments/results_tables.py fedmezo [runs/fedmezo]
    python experiments/results_tables.py flexlora [runs/flexlora-distributions]
    python experiments/results_tables.py ffa [runs/ffa-dp-grid]

Every row is a group of runs that differ only in their seed: the final figure's mean ± sample std and its 95%
Student-t interval over the seeds, and the difference from the claim's method on the same seed (the same split,
initialisation and sampling) with its 95% interval, which is what decides a claim when the seeds' spread is
larger than the difference. Unfinished runs count as far as they got and are marked; a same-seed difference
pairs two finished runs, or two runs at the same round. Each section also writes the mean curve per round of
every group as a PNG next to the runs (``results-<claim>.png``).
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fedlora.tracking.compare import (
    RunSummary,
    format_interval,
    format_mean_std,
    group_styles,
    plot_seed_curves,
)

Metric = Callable[[RunSummary], float | None]


class PerPair(NamedTuple):
    """A metric whose reading depends on the same-seed pair it is compared in: ``make(run, anchor_run)``
    returns the :data:`Metric` both runs of that pair are read with (e.g. at a budget both of them spent)."""

    make: Callable[[RunSummary, RunSummary], Metric]


def seed_of(run: RunSummary) -> str:
    return run.path.name.rsplit("_seed-", 1)[-1] if "_seed-" in run.path.name else run.seed()


def load(pattern_root: Path, pattern: str) -> list[RunSummary]:
    return [RunSummary.load(p) for p in sorted(pattern_root.glob(pattern)) if (p / "metrics.jsonl").exists()]


def having(runs: list[RunSummary], key: str, value: object) -> list[RunSummary]:
    """The runs whose config (``config.yaml``, dotted ``key``) holds ``value``: a sweep cell is found by what
    it ran, not by its folder's name."""
    return [r for r in runs if r.settings.get(key) == value]


def series(run: RunSummary, key: str) -> list[float]:
    """The recorded values of ``key``, round by round (rounds without it left out)."""
    return [float(r[key]) for r in run.records if r.get(key) is not None]


def last(key: str) -> Metric:
    """The last recorded value of ``key`` (the final evaluation)."""

    def value(run: RunSummary) -> float | None:
        found = series(run, key)
        return found[-1] if found else None

    return value


def difference(key: str, minus: str) -> Metric:
    """last(key) - last(minus) within one run (e.g. two evaluations of the same final model)."""

    def value(run: RunSummary) -> float | None:
        a, b = last(key)(run), last(minus)(run)
        return None if a is None or b is None else a - b

    return value


def megabytes_moved(run: RunSummary) -> float:
    """Bytes up plus down over every round, in MB."""
    return sum(float(r.get("bytes_up") or 0) + float(r.get("bytes_down") or 0) for r in run.records) / 1e6


def round_forward_equivalents(record: dict) -> float:
    """One round's client compute in forward passes of one batch, x1e-3: a zeroth-order client's recorded
    forward passes, 3 per first-order step (forward + backward, the backward about twice a forward)."""
    return 1e-3 * sum(
        float(c["forward_passes"])
        if c.get("forward_passes") is not None
        else 3.0 * float(c.get("steps") or 0)
        for c in record.get("clients", [])
    )


def at_compute(key: str, budget: float, cost: Callable[[dict], float] = round_forward_equivalents) -> Metric:
    """``key`` at the last evaluated round whose cumulative client compute (``cost`` per round: forward-pass
    equivalents x1e-3, or :func:`round_client_seconds`) is at most ``budget``: methods of different cost per
    round compared at equal client compute."""

    def value(run: RunSummary) -> float | None:
        spent, found = 0.0, None
        for record in run.records:
            spent += cost(record)
            if spent > budget * (1 + 1e-9):
                break
            if record.get(key) is not None:
                found = float(record[key])
        return found

    return value


def at_pair_budget(key: str, cost: Callable[[dict], float]) -> PerPair:
    """``key`` of both runs of a same-seed pair read by :func:`at_compute` at the pair's own budget, the smaller
    of the two runs' whole-run ``cost``: min(sum_t cost(run_t), sum_t cost(anchor_t)). A budget per pair, not
    one for the whole table, so that a run measured on a faster machine moves only its own pair's budget."""
    total = run_total(cost)
    return PerPair(lambda run, other: at_compute(key, min(total(run), total(other)), cost))


def rises(key: str) -> Metric:
    """Sum over rounds of max(0, value_t - value_{t-1}) of ``key``: how much a loss curve goes back up (0 for a
    curve that never rises), the instability the personalised learning rates are claimed to remove."""

    def value(run: RunSummary) -> float | None:
        values = series(run, key)
        return sum(max(0.0, b - a) for a, b in zip(values, values[1:], strict=False)) if values else None

    return value


def round_client_seconds(record: dict) -> float:
    """One round's client training seconds, summed over its clients: the adapter steps and, where a method
    trains its own model first (pFedLoRA's phase 1), those too."""
    return sum(
        float(c.get("train_seconds") or 0) + float(c.get("local_model_seconds") or 0)
        for c in record.get("clients", [])
    )


def run_total(cost: Callable[[dict], float]) -> Metric:
    """A per-round ``cost`` summed over the run's rounds: sum_t cost(record_t)."""
    return lambda run: sum(cost(record) for record in run.records)


def smallest_total(runs: list[RunSummary], cost: Callable[[dict], float]) -> float:
    """The smallest whole-run ``cost`` among ``runs`` (0 for none): the budget at which every run is compared."""
    return min((run_total(cost)(run) for run in runs), default=0.0)


# the whole run's client compute in forward-pass equivalents x1e-3, and its clients' training seconds
forward_equivalents = run_total(round_forward_equivalents)
client_seconds = run_total(round_client_seconds)


def peak(key: str) -> Metric:
    return lambda run: max(series(run, key), default=None)


def is_finished(run: RunSummary) -> bool:
    """The run wrote its final adapter (all its rounds, or early stopping's last)."""
    return (run.path / "global").is_dir()


def same_seed_differences(
    runs: list[RunSummary], anchor: list[RunSummary], metric: Metric | PerPair
) -> list[tuple[RunSummary, float]]:
    """(run, metric(run) - metric(anchor run of the same seed)) for every run where both are known and both
    runs are finished or have reached the same round (an unfinished run is not paired with one that went
    further: a difference at two different rounds measures the rounds, not the methods)."""
    theirs = {seed_of(r): r for r in anchor}
    pairs = []
    for run in runs:
        other = theirs.get(seed_of(run))
        if other is None:
            continue
        if not (is_finished(run) and is_finished(other)) and len(other.records) != len(run.records):
            continue
        read = metric.make(run, other) if isinstance(metric, PerPair) else metric
        mine, reference = read(run), read(other)
        if mine is not None and reference is not None:
            pairs.append((run, mine - reference))
    return pairs


def paired(runs: list[RunSummary], anchor: list[RunSummary], metric: Metric | PerPair, digits: int) -> str:
    """metric(run) - metric(anchor run of the same seed): mean and 95% interval over the seeds paired by
    :func:`same_seed_differences`, with their number when some of the group's seeds could not be paired."""
    diffs = [d for _, d in same_seed_differences(runs, anchor, metric)]
    if not diffs or all(d == 0 for d in diffs):
        return "-"
    text = f"{statistics.fmean(diffs):+.{digits}f} {format_interval(diffs, digits)}"
    return text if len(diffs) == len(runs) else f"{text}, {len(diffs)} seeds"


def rounds_done(runs: list[RunSummary]) -> str:
    done = [len(r.records) for r in runs]
    planned = max(int(r.settings.get("federation.rounds", 0)) for r in runs)
    finished = sum(1 for r in runs if is_finished(r))
    text = f"{finished}/{len(runs)}"
    return text if finished == len(runs) else f"{text} ({min(done)}-{max(done)} of {planned} rounds)"


def table(
    groups: dict[str, list[RunSummary]],
    anchor: str,
    columns: list[tuple[str, Metric, int]],
    paired_columns: list[tuple[str, Metric | PerPair, int]],
) -> str:
    """One markdown row per group: seeds finished, each column's mean ± std [95% interval], and each paired
    column's difference from ``anchor`` on the same seed."""
    head = ["run", "seeds done"]
    for name, _, _ in columns:
        head += [name, "95% interval"]
    head += [f"{name} minus {anchor}, same seed (95% interval)" for name, _, _ in paired_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, runs in groups.items():
        if not runs:
            continue
        row = [label, rounds_done(runs)]
        for _, metric, digits in columns:
            values = [v for v in (metric(r) for r in runs) if v is not None]
            row += [format_mean_std(values, digits), format_interval(values, digits)]
        for _, metric, digits in paired_columns:
            row.append("-" if label == anchor else paired(runs, groups.get(anchor, []), metric, digits))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def curves(
    groups: dict[str, list[RunSummary]],
    key: str,
    path: Path,
    ylabel: str,
    by_compute: bool = False,
    clip_at_start: bool = False,
) -> Path:
    """``key`` per round, each seed's run as a thin line and the median over a group's seeds as a thick one
    (:func:`~fedlora.tracking.compare.plot_seed_curves`). ``by_compute``: against the run's cumulative client
    compute (forward-pass equivalents) instead of the round. ``clip_at_start``: the y axis spans the lowest
    value to the highest first value (and 10% of that span above it), so that a run that diverges leaves the
    plot at the top instead of squashing every other curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(groups.values()):
        return path
    styles = group_styles(len(groups), plt.rcParams["axes.prop_cycle"].by_key()["color"])
    figure, axes = plt.subplots(figsize=(7, 4.5))
    starts, lowest = [], []
    for index, (label, runs) in enumerate(groups.items()):
        group_curves = []
        for run in runs:
            spent = itertools.accumulate(round_forward_equivalents(r) for r in run.records)
            xs = spent if by_compute else (float(r["round"]) for r in run.records)
            curve = [(x, r[key]) for x, r in zip(xs, run.records, strict=True) if r.get(key) is not None]
            group_curves.append(curve)
            starts += curve[:1]
            lowest += [min(y for _, y in curve)] if curve else []
        plot_seed_curves(axes, group_curves, label, styles[index])
    if clip_at_start and starts:
        low, high = min(lowest), max(y for _, y in starts)
        axes.set_ylim(low - 0.05 * (high - low), high + 0.1 * (high - low))
    axes.set_xlabel("client compute, forward-pass equivalents (x1e3)" if by_compute else "round")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def flattening(runs: list[RunSummary], key: str, window: int = 3) -> str:
    """Mean over seeds of ``key`` at the last round minus ``window`` rounds earlier: how much it still moves."""
    moves = []
    for run in runs:
        values = series(run, key)
        if len(values) > window:
            moves.append(values[-1] - values[-1 - window])
    return f"{statistics.fmean(moves):+.3f}" if moves else "-"


def flattening_line(groups: dict[str, list[RunSummary]], key: str = "eval_loss") -> str:
    return "Held-out loss change over the last 3 rounds (mean over seeds): " + ", ".join(
        f"{label} {flattening(runs, key)}" for label, runs in groups.items() if runs
    )


def majority_baseline(run: RunSummary) -> float:
    """Accuracy, unweighted mean over clients, when every client predicts its own most frequent training label
    on its test split: what label skew alone gives a personalised model (the row a classifier's base model
    stands in for; an untrained head is at chance)."""
    from collections import Counter

    from fedlora import load_config
    from fedlora.data.federation import build_federation

    federation = build_federation(load_config(str(run.path / "config.yaml")))
    scores = []
    for client in federation.clients:
        majority = Counter(e.label for e in client.train).most_common(1)[0][0]
        if client.test:
            scores.append(sum(e.label == majority for e in client.test) / len(client.test))
    return statistics.fmean(scores)


def pfedlora(root: Path) -> str:
    groups = {
        "pFedLoRA": load(root, "heterogeneous/*federate-true*_seed-*"),
        "standalone": load(root, "heterogeneous/*federate-false*_seed-*"),
        "LG-FedAvg": load(root, "baselines/name-lg-fedavg_seed-*"),
        "FedProto": load(root, "baselines/name-fedproto_seed-*"),
    }
    homogeneous = {
        "pFedLoRA": load(root, "homogeneous/*_seed-*"),
        "FedAvg, whole model": load(root, "homogeneous-fedavg/*_seed-*"),
    }
    accuracy = last("eval_client_accuracy_mean")
    columns = [
        ("accuracy, mean over clients", accuracy, 3),
        ("held-out loss", last("eval_loss"), 3),
        ("client train s / run", client_seconds, 0),
        ("MB up+down / run", megabytes_moved, 3),
    ]
    paired_columns = [("accuracy", accuracy, 3), ("loss", last("eval_loss"), 3)]
    curves(groups, "eval_client_accuracy_mean", root / "results-pfedlora.png", "accuracy, mean over clients")
    seeds = {seed_of(r): r for runs in groups.values() for r in runs}
    majority = [majority_baseline(seeds[s]) for s in sorted(seeds)]
    text = [
        "Clients of three models (MiniLM-6, MiniLM-2, SmolLM2-135M[:6]):",
        "",
        table(groups, "pFedLoRA", columns, paired_columns),
        "",
        flattening_line(groups),
        "",
        f"Each client predicting its most frequent training label ({len(majority)} seeds): accuracy, mean over "
        f"clients, {format_mean_std(majority, 3)} {format_interval(majority, 3)}",
        "",
        "Every client MiniLM-6 (whole-model FedAvg is possible):",
        "",
        table(homogeneous, "pFedLoRA", columns, paired_columns),
    ]
    return "\n".join(text)


def flat_from_line(groups: dict[str, list[RunSummary]], key: str = "eval_loss") -> str:
    """Per group and finished seed, the round from which ``key`` is flat (:func:`rounds_to_flatten`)."""
    parts = []
    for label, runs in groups.items():
        done = [r for r in runs if is_finished(r)]
        if done:
            flat = [rounds_to_flatten(series(r, key)) for r in done]
            parts.append(f"{label} " + ", ".join("not flat" if f is None else str(f) for f in flat))
    return "Round from which the held-out loss is flat (never 1% lower later), per seed: " + "; ".join(parts)


def fedmezo(root: Path) -> str:
    groups: dict[str, list[RunSummary]] = {}
    sweep = load(root, "fedmezo/*seed-*")
    for rule in ("frozen", "random", "round-wise", "five-round", "model-diff"):
        groups[f"FedMeZO {rule}"] = having(sweep, "strategy.options.lr_strategy", rule)
    groups["FedAvg SGD (matched)"] = load(root, "fedavg-sgd/*seed-*")  # no clipping, as the reference
    groups["FedAvg SGD, clipped at 1"] = load(root, "fedavg-sgd-clip1/*seed-*")  # fedlora's default grad_clip
    groups["FedAvg AdamW"] = load(root, "fedavg-adamw/*seed-*")
    finished = [r for runs in groups.values() for r in runs if is_finished(r)]
    # equal client compute: the smallest whole-run compute of any finished run (a zeroth-order run's)
    budget = smallest_total(finished, round_forward_equivalents)
    loss = last("eval_loss")
    at_budget, loss_rises = at_compute("eval_loss", budget), rises("eval_loss")
    # measured seconds differ between the machines runs were made on (several sessions' machines), so they are
    # compared only within a same-seed pair, at the seconds both runs spent
    at_seconds = at_pair_budget("eval_loss", round_client_seconds)
    # the same-seed differences at equal compute also use their pair's budget, so that a run short of some
    # client-rounds (a dropped client) moves only its own pair's, not every pair's
    at_pair_compute = at_pair_budget("eval_loss", round_forward_equivalents)
    columns = [
        ("held-out loss", loss, 3),
        ("held-out loss at equal client compute", at_budget, 3),
        ("loss rises, summed over rounds", loss_rises, 3),
        ("client forward-pass equivalents / run (x1e3)", forward_equivalents, 1),
        ("client training seconds / run (measured)", client_seconds, 0),
        ("peak RSS MB", peak("peak_rss_mb"), 0),
    ]
    curves(groups, "eval_loss", root / "results-fedmezo.png", "held-out loss", clip_at_start=True)
    curves(
        groups,
        "eval_loss",
        root / "results-fedmezo-compute.png",
        "held-out loss",
        by_compute=True,
        clip_at_start=True,
    )
    return "\n".join(
        [
            table(
                groups,
                "FedMeZO frozen",
                columns,
                [
                    ("loss", loss, 3),
                    ("loss at equal compute", at_pair_compute, 3),
                    ("loss at equal seconds", at_seconds, 3),
                    ("rises", loss_rises, 3),
                ],
            ),
            "",
            f"Equal client compute: {budget:.2f}e3 forward-pass equivalents, the smallest whole-run compute of any "
            "finished run (a first-order step counts 3), for the held-out loss column; the same-seed differences "
            "at equal compute and at equal measured client seconds use a budget per pair, the smaller of the two "
            "runs' compute or seconds (seconds are machine-dependent, and a run short of some client-rounds "
            "should move only its own pair).",
            "",
            base_model_line(root, groups["FedMeZO frozen"], "FedMeZO frozen"),
            "",
            flat_from_line(groups),
        ]
    )


# in increasing mean client rank (7.4, 17, 26.2, 41.3 with the scaled paper types r2, r8, r8, r50)
DISTRIBUTIONS = ("heavy-tail-light", "uniform", "normal", "heavy-tail-strong")


def mean_client_rank(run: RunSummary) -> float:
    """Mean attention-module rank over the run's clients (``clients.json``; ``r8`` or ``a30-m200`` names), the
    x-axis of FlexLoRA's "gains more as more clients have high ranks"."""
    clients = json.loads((run.path / "clients.json").read_text())
    ranks = [int(re.match(r"[ra](\d+)", c["rank"]).group(1)) for c in clients if c.get("rank")]  # type: ignore[union-attr]
    return statistics.fmean(ranks)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys on xs: sum((x - x̄)(y - ȳ)) / sum((x - x̄)²)."""
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - x_mean) ** 2 for x in xs
    )


def gain_trend(
    flexlora_runs: dict[str, list[RunSummary]], anchor: list[RunSummary], metric: Metric
) -> list[float]:
    """Per seed, the slope over distributions of metric(FlexLoRA) - metric(anchor, same seed) against the
    distribution's mean client rank: negative for a loss (positive for ROUGE-L) when FlexLoRA gains more as more
    clients have high ranks. Seeds with fewer than two finished distributions are left out."""
    points: dict[str, list[tuple[float, float]]] = {}
    for runs in flexlora_runs.values():
        for run, gain in same_seed_differences(runs, anchor, metric):
            if is_finished(run):
                points.setdefault(seed_of(run), []).append((mean_client_rank(run), gain))
    return [slope(*map(list, zip(*p, strict=True))) for p in points.values() if len({x for x, _ in p}) > 1]


def base_model_line(root: Path, anchor: list[RunSummary], label: str) -> str:
    """The base model (no training) on each seed's held-out examples (experiments/base_model_eval.py), and
    the ``anchor`` runs minus it on the same seed: whether federated training moved the model at all."""
    base = {
        p.stem.rsplit("-", 1)[-1]: json.loads(p.read_text())
        for p in sorted(root.glob("base-model_seed-*.json"))
    }
    if not base:
        return "Base model: not run yet."
    losses = [b["eval_loss"] for b in base.values()]
    moved = [
        loss - base[seed_of(r)]["eval_loss"]
        for r in anchor
        if seed_of(r) in base and is_finished(r) and (loss := last("eval_loss")(r)) is not None
    ]
    text = f"Base model, no training ({len(base)} seed{'s' if len(base) != 1 else ''}): held-out loss {format_mean_std(losses, 3)} {format_interval(losses, 3)}"
    rouges = [b["eval_rouge_l"] for b in base.values() if b.get("eval_rouge_l") is not None]
    if rouges:
        text += f", ROUGE-L {format_mean_std(rouges, 3)} {format_interval(rouges, 3)}"
    if moved:
        text += f"; {label} minus base model, same seed: {statistics.fmean(moved):+.3f} {format_interval(moved, 3)}"
    return text


def rounds_to_flatten(losses: list[float], tolerance: float = 0.01) -> int | None:
    """The first round from which the held-out loss never falls more than ``tolerance`` (relative) below its
    value at that round; None when even the last rounds still fall that much (not flat yet)."""
    for i, value in enumerate(losses[:-1]):
        if min(losses[i:]) >= value * (1 - tolerance) and i < len(losses) - 3:
            return i + 1
    return None


def flexlora_rounds_line(root: Path) -> str:
    runs = load(root, "flexlora-rounds/seed-*")
    if not runs:
        return "Rounds until FlexLoRA's held-out loss flattens: not run yet."
    run = runs[0]
    losses = series(run, "eval_loss")
    curves(
        {"FlexLoRA, uniform, seed 0": runs},
        "eval_loss",
        root / "results-flexlora-rounds.png",
        "held-out loss",
    )
    planned = int(run.settings.get("federation.rounds", 0))
    if not is_finished(run):
        return (
            f"Rounds until FlexLoRA's held-out loss flattens: in progress, {len(losses)} of {planned} rounds "
            f"(re-run experiments/flexlora_distributions.sh to resume)."
        )
    flat = rounds_to_flatten(losses)
    return (
        f"FlexLoRA (`uniform`, seed {seed_of(run)}), held-out loss per round over {len(losses)} rounds: "
        + ", ".join(f"{v:.3f}" for v in losses)
        + ". "
        + (
            f"Flat (never more than 1% lower later) from round {flat}."
            if flat
            else "Not flat: it still falls more than 1% within the last 3 rounds."
        )
    )


def flexlora(root: Path) -> str:
    sections = []
    bucket_label, upper_label = (
        "FedIT, every client at the smallest rank (bucket)",
        "FedIT, every client at the largest rank (upper bound)",
    )
    bucket = {bucket_label: load(root, "fedit-min/*seed-*"), upper_label: load(root, "fedit-max/*seed-*")}
    loss, rouge = last("eval_loss"), last("eval_rouge_l")
    columns = [("held-out loss", loss, 3), ("ROUGE-L", rouge, 3)]
    paired_columns = [("loss", loss, 3), ("ROUGE-L", rouge, 3)]
    flexlora_runs: dict[str, list[RunSummary]] = {}
    summary = [
        "| distribution | mean client rank | FlexLoRA minus bucket: loss | ROUGE-L | FlexLoRA minus HetLoRA: loss "
        "| ROUGE-L | FlexLoRA minus upper bound: loss |",
        "|" + "---|" * 7,
    ]
    for distribution in DISTRIBUTIONS:
        groups = {
            "FlexLoRA": load(root, f"flexlora/distribution-{distribution}_seed-*"),
            "HetLoRA": load(root, f"hetlora/distribution-{distribution}_seed-*"),
            **bucket,
        }
        if not groups["FlexLoRA"] and not groups["HetLoRA"]:
            continue
        flexlora_runs[distribution] = groups["FlexLoRA"]
        if groups["FlexLoRA"]:
            mine = groups["FlexLoRA"]
            summary.append(
                f"| `{distribution}` | {statistics.fmean(mean_client_rank(r) for r in mine):.1f} | "
                + " | ".join(
                    paired(mine, groups[other], metric, 3)
                    for other, metric in (
                        (bucket_label, loss),
                        (bucket_label, rouge),
                        ("HetLoRA", loss),
                        ("HetLoRA", rouge),
                        (upper_label, loss),
                    )
                )
                + " |"
            )
        full = [
            ("FlexLoRA, untruncated Delta: loss", last("eval_loss_full_delta"), 3),
            ("ROUGE-L", last("eval_rouge_l_full_delta"), 3),
            (
                "loss, untruncated minus rank-r_max truncation",
                difference("eval_loss_full_delta", "eval_loss"),
                4,
            ),
        ]
        sections += [
            f"`{distribution}`:",
            "",
            table(groups, bucket_label, columns, paired_columns),
            "",
            table({"FlexLoRA": groups["FlexLoRA"]}, "-", full, []),
            "",
        ]
    trend = [
        f"{name} {statistics.fmean(s):+.4f} {format_interval(s, 4)} ({len(s)} seeds)" if s else f"{name} -"
        for name, s in (
            ("loss", gain_trend(flexlora_runs, bucket[bucket_label], loss)),
            ("ROUGE-L", gain_trend(flexlora_runs, bucket[bucket_label], rouge)),
        )
    ]
    return "\n".join(
        [
            "FlexLoRA against the others on the same seed, by distribution, in increasing mean client rank:",
            "",
            *summary,
            "",
            "Slope of (FlexLoRA minus bucket) per unit of mean client rank, per seed over the distributions: "
            + ", ".join(trend),
            "",
            base_model_line(root, bucket[bucket_label], "FedIT at the smallest rank"),
            "",
            flexlora_rounds_line(root),
            "",
            *sections,
        ]
    )


def rate_lines(sweeps: list[tuple[list[RunSummary], str]]) -> str:
    """Per one-seed rate sweep (its runs, its label): final held-out accuracy at each learning rate, lowest
    first; ``-`` when no sweep is recorded."""
    lines = []
    for runs, label in sweeps:
        by_rate = sorted((float(r.settings["client.lr"]), last("eval_accuracy")(r)) for r in runs)
        if by_rate:
            lines.append(
                f"{label}: "
                + ", ".join(f"lr {lr:g} {'-' if acc is None else f'{acc:.1%}'}" for lr, acc in by_rate)
            )
    return "; ".join(lines) or "-"


def ffa(root: Path) -> str:
    """Claim 3 under DP: LoRA (FedIT) and FFA-LoRA at each epsilon over the seeds, FFA minus LoRA on the same
    seed (same split, initialisation, sampling and noise seed), and the rate sweeps each method's rate came from
    (LoRA's in ``runs/ffa-dp-gate``, FFA-LoRA's in ``ROOT/ffa-tune``); then both without DP, each at its own
    rate (``runs/ffa-nodp``, experiments/ffa_nodp.sh)."""
    accuracy = last("eval_accuracy")
    columns = [
        ("held-out accuracy", accuracy, 3),
        ("macro-F1", last("eval_macro_f1"), 3),
        ("held-out loss", last("eval_loss"), 3),
        ("epsilon spent (largest client)", last("epsilon_max"), 2),
    ]
    paired_columns = [
        ("accuracy", accuracy, 3),
        ("macro-F1", last("eval_macro_f1"), 3),
        ("loss", last("eval_loss"), 3),
    ]
    named = (re.fullmatch(r"(?:lora|ffa)-eps(\d+)", p.name) for p in root.iterdir() if p.is_dir())
    epsilons = sorted({int(m.group(1)) for m in named if m}, reverse=True)
    sections = []
    for epsilon in epsilons:
        groups = {
            "LoRA (FedIT)": load(root, f"lora-eps{epsilon}/seed-*"),
            "FFA-LoRA": load(root, f"ffa-eps{epsilon}/seed-*"),
        }
        sections += [f"epsilon {epsilon}:", "", table(groups, "LoRA (FedIT)", columns, paired_columns), ""]
    gate = load(root.parent / "ffa-dp-gate", "lora-eps6/*_seed-*")
    rates = rate_lines([(gate, "LoRA"), (load(root, "ffa-tune/*_seed-*"), "FFA-LoRA")])
    no_dp = root.parent / "ffa-nodp"
    no_dp_groups = {"LoRA (FedIT)": load(no_dp, "lora/seed-*"), "FFA-LoRA": load(no_dp, "ffa/seed-*")}
    no_dp_rates = rate_lines(
        [(load(no_dp, "tune-fedit/*_seed-*"), "LoRA"), (load(no_dp, "tune-ffa-lora/*_seed-*"), "FFA-LoRA")]
    )
    without = [
        f"Without DP (AdamW, 6 rounds x 5 steps), each method's rate tuned on seed 1: {no_dp_rates}",
        "",
        table(no_dp_groups, "LoRA (FedIT)", columns[:3], paired_columns),
    ]
    return "\n".join(
        [
            f"Each method's rate, tuned at epsilon 6 on seed 1 (20 rounds x 10 SGD steps): {rates}",
            "",
            *sections,
            *(without if any(no_dp_groups.values()) else []),
        ]
    )


if __name__ == "__main__":
    claims = {
        "pfedlora": (pfedlora, "runs/pfedlora-widths"),
        "fedmezo": (fedmezo, "runs/fedmezo"),
        "flexlora": (flexlora, "runs/flexlora-distributions"),
        "ffa": (ffa, "runs/ffa-dp-grid"),
    }
    if len(sys.argv) < 2 or sys.argv[1] not in claims:
        raise SystemExit(f"usage: python experiments/results_tables.py {{{'|'.join(claims)}}} [RUNS]")
    build, default = claims[sys.argv[1]]
    root = Path(sys.argv[2] if len(sys.argv) > 2 else default)
    if not root.is_dir():
        raise SystemExit(f"no runs folder {root}: run its experiments/ script first")
    print(build(root))
