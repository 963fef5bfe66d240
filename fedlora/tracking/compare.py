"""Side-by-side comparison of finished runs: one markdown table and one figure.

Each run directory contributes its config (what differs between the runs becomes its label), its
metrics.jsonl (final evaluation, curves), its bytes and, when ``fedlora eval --tasks`` scored it, its benchmark
accuracies (``eval/tasks.json``). Runs whose configs differ only in seeds (``federation.seed``, ``data.seed``,
``adapter.init_seed``, ``faults.seed``) form one group, reported as mean and standard deviation (sample std,
n - 1) over the seeds, with the number of runs and the seeds behind it.

The figure (``compare.png``): every metric evaluated in several rounds as curves per round, the held-out loss
against the megabytes sent (up + down, cumulative), and every metric evaluated once (after the last round:
ROUGE-L, a benchmark's accuracy) as bars with their 95% interval. Each group keeps one colour, marker and line
style across the panels, so runs that overlap stay visible.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

SEED_KEYS = ("federation.seed", "data.seed", "adapter.init_seed", "faults.seed")
IGNORED_KEYS = ("name", "output.")
# final metric -> (column title, key holding the number of examples behind it)
FINAL_METRICS = {
    "eval_loss": ("held-out loss", "eval_examples"),
    "eval_perplexity": ("perplexity", "eval_examples"),
    "eval_accuracy": ("accuracy", "eval_examples"),
    "eval_macro_f1": ("macro-F1", "eval_examples"),
    "eval_rouge_l": ("ROUGE-L", "eval_generated"),
    "eval_exact_match": ("exact match", "eval_generated"),
    "eval_task_score": ("task score", "eval_generated"),
}


#: a benchmark accuracy in :attr:`RunSummary.final`: ``task_<name>_<metric>`` (with ``..._stderr``, ``task_<name>_n``)
TASK_PREFIX = "task_"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value
    return out


@dataclass
class RunSummary:
    """What the comparison needs from one run directory."""

    path: Path
    settings: dict[str, Any]
    records: list[dict[str, Any]]
    final: dict[str, float] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RunSummary:
        config, metrics = path / "config.yaml", path / "metrics.jsonl"
        if not config.exists() or not metrics.exists():
            raise ValueError(f"{path} is not a run directory (needs config.yaml and metrics.jsonl)")
        records = []
        for number, line in enumerate(metrics.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{metrics}:{number}: not a JSON line") from None
        settings = flatten(yaml.safe_load(config.read_text()) or {})
        summary = cls(path, settings, records)
        evaluated = [
            r for r in records if r.get("eval_loss") is not None or r.get("eval_rouge_l") is not None
        ]
        if evaluated:
            last = evaluated[-1]
            summary.final = {k: float(v) for k, v in last.items() if k.startswith("eval_") and v is not None}
        summary.final["rounds"] = float(len(records))
        summary.final["bytes_up"] = float(sum(r.get("bytes_up", 0) for r in records))
        summary.final["bytes_down"] = float(sum(r.get("bytes_down", 0) for r in records))
        for key, name in (("seconds", "seconds_per_round"), ("aggregate_seconds", "aggregate_seconds")):
            seconds = [r[key] for r in records if r.get(key) is not None]
            if seconds:
                summary.final[name] = sum(seconds) / len(seconds)
        summary.final.update(task_figures(path))
        return summary

    def seed(self) -> str:
        return str(self.settings.get("federation.seed"))


def task_figures(run: Path) -> dict[str, float]:
    """The adapter's benchmark accuracies from ``run/eval/tasks.json`` (``fedlora eval --tasks``), as
    ``task_<name>_<metric>`` with its ``_stderr`` and the task's ``task_<name>_n``; empty without the file."""
    path = run / "eval" / "tasks.json"
    if not path.exists():
        return {}
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (json.JSONDecodeError, KeyError):
        raise ValueError(f"{path}: not a fedlora eval --tasks file (no 'tasks' mapping)") from None
    out: dict[str, float] = {}
    for name, task in tasks.items():
        out[f"{TASK_PREFIX}{name}_n"] = float(task["n"])
        for metric in ("acc", "acc_norm"):
            if metric in task.get("adapter", {}):
                out[f"{TASK_PREFIX}{name}_{metric}"] = float(task["adapter"][metric])
                out[f"{TASK_PREFIX}{name}_{metric}_stderr"] = float(task["adapter"][f"{metric}_stderr"])
    return out


def task_keys(groups: list[Group]) -> list[str]:
    """The benchmark accuracies any run has (``task_mmlu_acc``...), in the order first seen."""
    keys: dict[str, None] = {}
    for g in groups:
        for run in g.runs:
            for key in run.final:
                if key.startswith(TASK_PREFIX) and not key.endswith(("_stderr", "_n")):
                    keys[key] = None
    return list(keys)


def split_task_key(key: str) -> tuple[str, str]:
    """``task_commonsense_qa_acc_norm`` -> (``commonsense_qa``, ``acc_norm``)."""
    body = key[len(TASK_PREFIX) :]
    metric = "acc_norm" if body.endswith("_acc_norm") else "acc"
    return body[: -len(metric) - 1], metric


def task_title(key: str) -> str:
    """``task_commonsense_qa_acc_norm`` -> ``commonsense_qa acc_norm``."""
    return " ".join(split_task_key(key))


def differing_keys(runs: list[RunSummary]) -> list[str]:
    """Config keys (dotted) whose values are not the same in every run, seeds and output excluded, and
    a method's own options when they follow from ``strategy.name`` (each method's defaults).

    Only keys every run has count (runs made by older fedlora versions lack newer sections), and the
    method options any run has (another method has none of them)."""
    common = set.intersection(*(set(r.settings) for r in runs))
    keys = sorted(common | {k for r in runs for k in r.settings if k.startswith("strategy.options.")})

    def shown(run: RunSummary, key: str) -> str:
        return json.dumps(run.settings.get(key), sort_keys=True, default=str)

    out = []
    for key in keys:
        if key in SEED_KEYS or any(key == p or key.startswith(p) for p in IGNORED_KEYS):
            continue
        if len({shown(r, key) for r in runs}) < 2:
            continue
        if key.startswith("strategy.options"):
            per_method: dict[str, set[str]] = {}
            for run in runs:
                per_method.setdefault(shown(run, "strategy.name"), set()).add(shown(run, key))
            if all(len(values) == 1 for values in per_method.values()):
                continue  # one value per method: the method's name says it
        out.append(key)
    return out


def expand_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories as given, with a folder of runs (a sweep's output) replaced by the runs in it."""
    out: list[Path] = []
    for path in paths:
        if not (path / "config.yaml").exists() and path.is_dir():
            inside = sorted(
                p.parent for p in path.glob("*/config.yaml") if (p.parent / "metrics.jsonl").exists()
            )
            if inside:
                out += inside
                continue
        out.append(path)
    return out


def label(run: RunSummary, keys: list[str]) -> str:
    """``flexlora`` or ``fedit resources.force=min``: the strategy plus the settings that differ."""
    parts = [str(run.settings.get("strategy.name"))]
    parts += [f"{k}={_show(run.settings.get(k))}" for k in keys if k != "strategy.name"]
    return " ".join(parts)


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def mean_interval(values: list[float], level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` confidence interval of the mean of ``values`` (Student's t, n - 1 degrees of freedom):
    mean -+ t_{(1 + level) / 2, n - 1} s / sqrt(n); None below two values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    mean = statistics.fmean(values)
    half = t.ppf((1 + level) / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean - half, mean + half


def format_interval(values: list[float], digits: int = 4) -> str:
    """``[lo, hi]`` of :func:`mean_interval`, or ``-`` below two values."""
    bounds = mean_interval(values)
    return "-" if bounds is None else f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f}]"


def format_mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± sample std`` over seeds, the value alone for one, ``-`` for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) > 1:
        return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"
    return f"{mean:.{digits}f}"


@dataclass
class Group:
    label: str
    runs: list[RunSummary]

    def values(self, key: str) -> list[float]:
        return [r.final[key] for r in self.runs if key in r.final]

    def interval(self, key: str, digits: int = 4) -> str:
        """The 95% confidence interval of the mean over the seeds (:func:`mean_interval`)."""
        return format_interval(self.values(key), digits)

    def cell(self, key: str, digits: int = 4) -> str:
        return format_mean_std(self.values(key), digits)


def group_runs(runs: list[RunSummary]) -> list[Group]:
    keys = differing_keys(runs)
    groups: dict[str, Group] = {}
    for run in runs:
        name = label(run, keys)
        groups.setdefault(name, Group(name, [])).runs.append(run)
    return list(groups.values())


def markdown_table(groups: list[Group]) -> str:
    metrics = [m for m in FINAL_METRICS if any(g.values(m) for g in groups)]
    tasks = task_keys(groups)
    head = [
        "method",
        "runs (seeds)",
        *(FINAL_METRICS[m][0] for m in metrics),
        *([f"{FINAL_METRICS[metrics[0]][0]} 95% CI"] if metrics else []),
        "examples",
        *(f"{task_title(k)} (items)" for k in tasks),
        "MB up",
        "MB down",
        "s / round",
        "server s / round",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        seeds = ",".join(sorted({r.seed() for r in g.runs}))
        examples = sorted(
            {
                f"{int(r.final[FINAL_METRICS[m][1]])}"
                for r in g.runs
                for m in metrics
                if FINAL_METRICS[m][1] in r.final
            }
        )
        mb = [r.final["bytes_up"] / 1e6 for r in g.runs]
        mb_down = [r.final.get("bytes_down", 0) / 1e6 for r in g.runs]
        row = [
            g.label,
            f"{len(g.runs)} ({seeds})",
            *(g.cell(m) for m in metrics),
            *([g.interval(metrics[0])] if metrics else []),
            "/".join(examples) or "-",
            *(f"{g.cell(k)} ({task_items(g, k)})" if g.values(k) else "-" for k in tasks),
            f"{statistics.fmean(mb):.1f}",
            f"{statistics.fmean(mb_down):.1f}",
            g.cell("seconds_per_round", 1),
            g.cell("aggregate_seconds", 3),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def task_items(group: Group, key: str) -> str:
    """The item counts behind a benchmark column of ``group`` (``200``, or ``200/2850`` where runs differ)."""
    counts = f"{TASK_PREFIX}{split_task_key(key)[0]}_n"
    return "/".join(sorted({f"{int(r.final[counts])}" for r in group.runs if counts in r.final}))


Curve = list[tuple[float, float]]  # one run's (x, value) points, x increasing (the round, or compute spent)


def median_curve(curves: list[Curve]) -> Curve:
    """The median over runs at each point index that every run reached: (x of the first run, median_j
    y_j[i]) for i < min_j len(curve_j). A median, not a mean: with one seed of three diverged, the group's
    line follows the middle seed instead of jumping with the diverged one."""
    curves = [c for c in curves if c]
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [(curves[0][i][0], statistics.median(c[i][1] for c in curves)) for i in range(length)]


#: markers and line styles, cycled with the colours so that groups whose curves overlap stay apart
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LineStyle = Literal["-", "--", "-.", ":"]
LINE_STYLES: tuple[LineStyle, ...] = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class Style:
    """How one group is drawn in every panel."""

    colour: str
    marker: str
    line_style: LineStyle


def group_styles(count: int, colours: list[str]) -> list[Style]:
    """``count`` styles: colour, marker and line style each cycling through its own list (lengths 10, 8, 4 give
    40 distinct combinations), so two groups never share all three before the 41st."""
    return [
        Style(colours[i % len(colours)], MARKERS[i % len(MARKERS)], LINE_STYLES[i % len(LINE_STYLES)])
        for i in range(count)
    ]


def plot_seed_curves(ax: Any, curves: list[Curve], label: str, style: Style) -> None:
    """One group on ``ax``: each run (seed) as a thin faint line and :func:`median_curve` as a thick line with
    the group's markers and line style, labelled with the number of seeds behind it."""
    curves = [c for c in curves if c]
    if not curves:
        return
    if len(curves) > 1:
        for curve in curves:
            ax.plot(
                *zip(*curve, strict=True),
                color=style.colour,
                linestyle=style.line_style,
                linewidth=0.7,
                alpha=0.35,
            )
    median = median_curve(curves)
    seeds = f"median of {len(curves)} seeds" if len(curves) > 1 else "1 seed"
    ax.plot(
        *zip(*median, strict=True),
        color=style.colour,
        marker=style.marker,
        linestyle=style.line_style,
        markersize=4,
        markerfacecolor="none",
        markevery=max(1, len(median) // 12),  # a dozen markers a line: enough to tell the lines apart
        label=f"{label} ({seeds})",
    )


def clip_to_medians(ax: Any, medians: list[Curve]) -> None:
    """The y range of the groups' median lines (5% margin): a diverged seed's thin line (a loss of 20 beside
    2) leaves the panel instead of flattening every group's line against its floor."""
    values = [y for curve in medians for _, y in curve]
    if values:
        low, high = min(values), max(values)
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - margin, high + margin)


def evaluated_rounds(run: RunSummary, key: str) -> int:
    return sum(1 for r in run.records if r.get(key) is not None)


def curve_keys(groups: list[Group]) -> list[str]:
    """The final metrics some run evaluated in two rounds or more: drawn as curves per round."""
    runs = [run for g in groups for run in g.runs]
    return [
        k for k in FINAL_METRICS if k != "eval_perplexity" and any(evaluated_rounds(r, k) > 1 for r in runs)
    ]


def bar_keys(groups: list[Group]) -> list[str]:
    """The final metrics no run evaluated in more than one round (ROUGE-L after the last round, a benchmark's
    accuracy): drawn as bars, a one-point line says nothing."""
    runs = [run for g in groups for run in g.runs]
    once = [
        k
        for k in FINAL_METRICS
        if k != "eval_perplexity"
        and any(k in r.final for r in runs)
        and all(evaluated_rounds(r, k) <= 1 for r in runs)
    ]
    return once + task_keys(groups)


def bar_interval(group: Group, key: str) -> tuple[float, float] | None:
    """The 95% interval of a bar: over the group's seeds (Student's t) with two runs or more; for one run
    of a benchmark, its items' mean -+ 1.96 standard errors; else None."""
    bounds = mean_interval(group.values(key))
    if bounds is not None:
        return bounds
    stderr = [r.final[key + "_stderr"] for r in group.runs if key + "_stderr" in r.final]
    if len(group.runs) == 1 and stderr:
        mean = group.values(key)[0]
        return mean - 1.96 * stderr[0], mean + 1.96 * stderr[0]
    return None


def plot_bars(ax: Any, groups: list[Group], key: str, styles: list[Style]) -> None:
    """One bar per group at the mean over its seeds, the 95% interval (:func:`bar_interval`) as an error bar
    and each seed's value as a dot."""
    for index, (g, style) in enumerate(zip(groups, styles, strict=True)):
        values = g.values(key)
        if not values:
            continue
        mean = statistics.fmean(values)
        ax.bar(index, mean, color=style.colour, alpha=0.55, edgecolor=style.colour, hatch=None)
        bounds = bar_interval(g, key)
        if bounds is not None:
            ax.errorbar(index, mean, yerr=[[mean - bounds[0]], [bounds[1] - mean]], color="black", capsize=4)
        ax.plot(
            [index] * len(values), values, linestyle="none", marker=style.marker, color="black", markersize=4
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([str(i + 1) for i in range(len(groups))])
    ax.set_xlabel("group (legend order)")


def figure_panels(groups: list[Group]) -> list[tuple[str, str]]:
    """The panels of the comparison figure, in order: ``("curve", metric)`` per metric evaluated in several
    rounds, ``("loss_vs_mb", "eval_loss")`` when the held-out loss is one of them, ``("bars", metric)`` per metric
    evaluated once (:func:`bar_keys`)."""
    curves_of = curve_keys(groups)
    panels = [("curve", k) for k in curves_of]
    if "eval_loss" in curves_of:
        panels.append(("loss_vs_mb", "eval_loss"))
    panels += [("bars", k) for k in bar_keys(groups)]
    return panels or [("loss_vs_mb", "eval_loss")]


def plot_comparison(groups: list[Group], path: Path) -> Path:
    """The comparison figure: per-round curves of each metric evaluated in several rounds (each seed thin, the
    median over seeds thick: :func:`plot_seed_curves`), the held-out loss against the cumulative megabytes sent
    up and down, and bars with 95% intervals for each metric evaluated once (:func:`plot_bars`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = figure_panels(groups)
    titles = {
        **{k: v[0] for k, v in FINAL_METRICS.items()},
        **{k: task_title(k) for _, k in panels if k.startswith(TASK_PREFIX)},
    }
    styles = group_styles(len(groups), plt.rcParams["axes.prop_cycle"].by_key()["color"])
    columns = min(len(panels), 3)
    rows = (len(panels) + columns - 1) // columns
    legend_columns = 1 if len(groups) > 6 else 2
    legend_inches = 0.2 + 0.16 * -(-len(groups) // legend_columns)  # one 7-point line per row of the legend
    height = 3.6 * rows + legend_inches
    fig, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, height), dpi=110, squeeze=False)
    for ax, (kind, key) in zip(axes.flat, panels, strict=False):
        if kind == "bars":
            plot_bars(ax, groups, key, styles)
            ax.set_title(f"{titles[key]} (after the last round)")
        else:
            medians: list[Curve] = []
            for g, style in zip(groups, styles, strict=True):
                curves = []
                for run in g.runs:
                    sent, curve = 0.0, []
                    for r in run.records:
                        sent += (r.get("bytes_up", 0) + r.get("bytes_down", 0)) / 1e6
                        if r.get(key) is not None:
                            x = sent if kind == "loss_vs_mb" else float(r["round"])
                            curve.append((x, float(r[key])))
                    curves.append(curve)
                plot_seed_curves(ax, curves, g.label, style)
                medians.append(median_curve(curves))
            clip_to_medians(ax, medians)
            if kind == "loss_vs_mb":
                ax.set_title(f"{titles[key]} vs communication")
                ax.set_xlabel("MB sent, up + down (cumulative)")
            else:
                ax.set_title(titles[key])
                ax.set_xlabel("round")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], color=st.colour, marker=st.marker, linestyle=st.line_style, markerfacecolor="none")
        for st in styles
    ]
    seeds = [f"{len(g.runs)} seed{'s' if len(g.runs) > 1 else ''}" for g in groups]
    fig.legend(
        handles,
        [f"{i + 1}. {g.label} ({n})" for i, (g, n) in enumerate(zip(groups, seeds, strict=True))],
        loc="lower center",
        fontsize=7,
        ncol=legend_columns,
        frameon=False,
    )
    fig.tight_layout(rect=(0, legend_inches / height, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def compare_runs(run_dirs: list[Path], output: Path | None = None) -> str:
    """Markdown table of the runs' final metrics (a folder of runs, a sweep's, stands for the runs in it);
    with ``output`` also writes compare.md, compare.json and compare.png there."""
    runs = [RunSummary.load(p) for p in expand_run_dirs([Path(p) for p in run_dirs])]
    if not runs:
        raise ValueError("compare needs at least one run directory")
    groups = group_runs(runs)
    table = markdown_table(groups)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
        (output / "compare.md").write_text(table + "\n")
        summary = [
            {"method": g.label, "runs": [str(r.path) for r in g.runs], "final": [r.final for r in g.runs]}
            for g in groups
        ]
        (output / "compare.json").write_text(json.dumps(summary, indent=1))
        plot_comparison(groups, output / "compare.png")
    return table
