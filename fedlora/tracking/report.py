"""What the user sees: the progress bar over rounds, the end-of-run summary table, and curves.png."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class RoundProgress:
    """A rich progress bar over rounds showing the last round's losses; without a bar (``--no-progress``, or
    output to a file) one line per round instead."""

    def __init__(
        self, total: int, done: int = 0, console: Console | None = None, enabled: bool = True
    ) -> None:
        self.progress = Progress(
            TextColumn("[bold]rounds"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task("rounds", total=total, completed=done, status="")

    def __enter__(self) -> RoundProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, text: str) -> None:
        self.progress.update(self.task, status=text)

    def advance(self, record: dict[str, Any]) -> None:
        self.progress.update(self.task, advance=1, status=_short(record))
        console = self.progress.console
        if self.progress.disable or not console.is_terminal:  # no live bar (off, or a log): one line a round
            done = int(self.progress.tasks[0].completed)
            console.print(
                f"round {done}/{int(self.progress.tasks[0].total or 0)}: {_short(record)}  ({record.get('seconds', 0):.1f} s)"
            )


def _fmt(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _short(record: dict[str, Any]) -> str:
    return f"train {_fmt(record.get('train_loss'))}  eval {_fmt(record.get('eval_loss'))}"


def rows_for_one_screen(records: list[dict[str, Any]], max_rows: int = 16) -> list[dict[str, Any]]:
    """All rounds if they fit, else ``max_rows`` evenly spaced ones, always with the first and the last."""
    if len(records) <= max_rows:
        return records
    step = (len(records) - 1) / (max_rows - 1)
    return [records[round(i * step)] for i in range(max_rows)]


def summary_table(records: list[dict[str, Any]], title: str) -> Table:
    """One row per round (evenly thinned to one screen): losses, generation metrics when measured, clients
    (accepted/sampled), bytes, seconds."""
    table = Table(title=title, title_justify="left")
    generation = [
        (key, name)
        for key, name in (
            ("epsilon_max", "ε max"),
            ("epsilon_client", "ε client"),
            ("eval_macro_f1", "macro-F1"),
            ("eval_rouge_l", "ROUGE-L"),
            ("eval_exact_match", "exact match"),
            ("eval_task_score", "task score"),
        )
        if any(r.get(key) is not None for r in records)
    ]
    for column in (
        "round",
        "train loss",
        "eval loss",
        "ppl/acc",
        *(name for _, name in generation),
        "clients",
        "rejected",
        "bytes up",
        "bytes down",
        "s",
    ):
        table.add_column(column, justify="right")
    for r in rows_for_one_screen(records):
        quality = r.get("eval_accuracy", r.get("eval_perplexity"))
        table.add_row(
            str(r["round"]),
            _fmt(r.get("train_loss")),
            _fmt(r.get("eval_loss")),
            _fmt(quality, 3),
            *(_fmt(r.get(key)) for key, _ in generation),
            f"{r.get('num_clients', 0)}/{r.get('num_sampled', r.get('num_clients', 0))}",
            str(len(r.get("rejected", []))),
            human_bytes(r.get("bytes_up", 0)),
            human_bytes(r.get("bytes_down", 0)),
            _fmt(r.get("seconds"), 1),
        )
    return table


def plot_curves(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Train and held-out loss per round as a PNG (matplotlib, no display needed)."""
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for key, label in (
        ("train_loss", "train loss (sampled clients' mean)"),
        ("eval_loss", "held-out loss (global adapter)"),
    ):
        points = [(r["round"], r[key]) for r in records if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
