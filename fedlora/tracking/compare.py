"""Side-by-side comparison of finished runs: one markdown table and overlaid curves.

Each run directory contributes its config (what differs between the runs becomes its label), its
metrics.jsonl (final evaluation, curves) and its bytes. Runs whose configs differ only in seeds
(``federation.seed``, ``data.seed``, ``adapter.init_seed``, ``faults.seed``) form one group, reported as mean and standard
deviation (sample std, n - 1) over the seeds, with the number of runs and the seeds behind it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        return summary

    def seed(self) -> str:
        return str(self.settings.get("federation.seed"))


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
    head = [
        "method",
        "runs (seeds)",
        *(FINAL_METRICS[m][0] for m in metrics),
        *([f"{FINAL_METRICS[metrics[0]][0]} 95% CI"] if metrics else []),
        "examples",
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
            f"{statistics.fmean(mb):.1f}",
            f"{statistics.fmean(mb_down):.1f}",
            g.cell("seconds_per_round", 1),
            g.cell("aggregate_seconds", 3),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


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


def plot_seed_curves(ax: Any, curves: list[Curve], label: str, colour: str | None = None) -> None:
    """One group on ``ax``: each run (seed) as a thin faint line and :func:`median_curve` as a thick line with
    markers, labelled with the number of seeds behind it."""
    curves = [c for c in curves if c]
    if not curves:
        return
    if len(curves) > 1:
        for curve in curves:
            ax.plot(*zip(*curve, strict=True), color=colour, linewidth=0.7, alpha=0.35)
    median = median_curve(curves)
    seeds = f"median of {len(curves)} seeds" if len(curves) > 1 else "1 seed"
    ax.plot(*zip(*median, strict=True), color=colour, marker="o", markersize=3, label=f"{label} ({seeds})")


def plot_comparison(groups: list[Group], path: Path) -> Path:
    """Held-out loss, the generation/accuracy metric and cumulative MB up per round: per group each seed's
    run as a thin line and the median over its seeds as a thick one (:func:`plot_seed_curves`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("eval_loss", "held-out loss")]
    for key in ("eval_rouge_l", "eval_accuracy", "eval_exact_match", "eval_task_score"):
        if any(r.get(key) is not None for g in groups for run in g.runs for r in run.records):
            panels.append((key, FINAL_METRICS[key][0]))
    panels.append(("cumulative_mb_up", "cumulative MB up"))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), dpi=110)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for index, g in enumerate(groups):
            curves = []
            for run in g.runs:
                total, curve = 0.0, []
                for r in run.records:
                    total += r.get("bytes_up", 0) / 1e6
                    value = total if key == "cumulative_mb_up" else r.get(key)
                    if value is not None:
                        curve.append((float(r["round"]), float(value)))
                curves.append(curve)
            plot_seed_curves(ax, curves, g.label, colours[index % len(colours)])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
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
