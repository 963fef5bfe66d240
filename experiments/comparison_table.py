"""The tables of docs/comparison.md from the runs of experiments/comparison.sh: per method the held-out loss
(mean, sample std and 95% interval over the seeds, and minus the anchor's on the same seed), ROUGE-L of the
seed-0 run where `fedlora eval` added it (eval/test.json) and minus the anchor's paired example by example
(eval/test.predictions.jsonl), MB up and down per run, server seconds per round, and the base model's row
(experiments/base_model_eval.py per seed; ROUGE-L from experiments/comparison_rouge.sh).

    python experiments/comparison_table.py [runs/comparison]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from fedlora.tracking.compare import format_interval, format_mean_std


def megabytes(value: float) -> str:
    """One decimal, or three significant digits below 1 MB (FedKSeed's kilobytes do not read as 0.0)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def final_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("eval_loss") is not None][-1]["eval_loss"]


def paired(dirs: list[Path], anchor: list[Path]) -> str:
    """Loss minus the anchor's on the same seed (the same held-out clients, split and sampling), mean and 95%
    interval over the seeds both have: the differences the seeds' spread would otherwise hide."""
    theirs = {d.name.rsplit("_seed-", 1)[1]: final_loss(d) for d in anchor}
    diffs = [
        final_loss(d) - theirs[d.name.rsplit("_seed-", 1)[1]]
        for d in dirs
        if d.name.rsplit("_seed-", 1)[1] in theirs
    ]
    if not diffs or all(x == 0 for x in diffs):
        return "-"
    return f"{statistics.fmean(diffs):+.3f} {format_interval(diffs, 3)}"


def example_scores(run: Path) -> list[tuple[tuple[int, str], float]] | None:
    """((client, input), ROUGE-L) of each generated example of the run's test evaluation, in order."""
    path = run / "eval" / "test.predictions.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [((int(r["client"]), str(r["input"])), float(r["rouge_l"])) for r in rows]


def paired_rouge(run: Path | None, anchor: Path | None) -> str:
    """ROUGE-L minus the anchor's on the same examples (same seed-0 held-out clients), mean and 95% interval
    over the examples."""
    mine, theirs = (example_scores(r) if r is not None else None for r in (run, anchor))
    if not mine or not theirs or run == anchor:
        return "-"
    if [key for key, _ in mine] != [key for key, _ in theirs]:
        raise SystemExit(f"{run} and {anchor} generated for different examples; re-run comparison_rouge.sh")
    diffs = [a - b for (_, a), (_, b) in zip(mine, theirs, strict=True)]
    return f"{statistics.fmean(diffs):+.3f} {format_interval(diffs, 3)}"


def seed0(dirs: list[Path]) -> Path | None:
    return next((d for d in dirs if d.name.endswith("_seed-0")), None)


def table(runs: dict[str, list[Path]], base: list[float] | None, base_rouge: str, anchor: str) -> str:
    lines = [
        f"| method | seeds | held-out loss | 95% interval | minus {anchor}, same seed (95% interval) | ROUGE-L (seed 0) "
        f"| ROUGE-L minus {anchor}, same examples (95% interval) | MB up / run | MB down / run | server s / round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, dirs in runs.items():
        losses, up, down, rouge, examples, server = [], [], [], "-", set(), []
        for d in dirs:
            records = [
                json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()
            ]
            last = [r for r in records if r.get("eval_loss") is not None][-1]
            losses.append(last["eval_loss"])
            examples.add(int(last["eval_examples"]))
            up.append(sum(r["bytes_up"] for r in records) / 1e6)
            down.append(sum(r["bytes_down"] for r in records) / 1e6)
            server += [r["aggregate_seconds"] for r in records if r.get("aggregate_seconds") is not None]
            test = d / "eval" / "test.json"
            if d.name.endswith("seed-0") and test.exists():
                figures = json.loads(test.read_text())
                rouge = f"{figures['eval_rouge_l']:.3f} ({figures['eval_generated']} ex.)"
        lines.append(
            f"| {label} | {len(dirs)} | {format_mean_std(losses, 3)} ({'/'.join(map(str, sorted(examples)))} ex.) | "
            f"{format_interval(losses, 3)} | {paired(dirs, runs[anchor])} | {rouge} | "
            f"{paired_rouge(seed0(dirs), seed0(runs[anchor]))} | {megabytes(statistics.fmean(up))} | "
            f"{megabytes(statistics.fmean(down))} | {f'{statistics.fmean(server):.3f}' if server else '-'} |"
        )
    if base:
        lines.append(
            f"| base model (no training) | {len(base)} | {format_mean_std(base, 3)} | {format_interval(base, 3)} | - | "
            f"{base_rouge} | - | 0 | 0 | - |"
        )
    return "\n".join(lines)


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/comparison")
    homogeneous: dict[str, list[Path]] = {}
    for d in sorted([*root.glob("part*/name-*_seed-*")]):
        if (d / "global").is_dir():
            homogeneous.setdefault(d.name.split("_seed-")[0].removeprefix("name-"), []).append(d)
    base = [json.loads(p.read_text())["eval_loss"] for p in sorted(root.glob("base-model_seed-[0-9].json"))]
    base_rouge = "-"
    if (root / "base-model_seed-0_rouge.json").exists():
        figures = json.loads((root / "base-model_seed-0_rouge.json").read_text())
        base_rouge = f"{figures['eval_rouge_l']:.3f} ({figures['eval_generated']} ex.)"
    print("## Homogeneous rank (r8 for every client)\n")
    print(table(homogeneous, base, base_rouge, "fedit"))
    hetero: dict[str, list[Path]] = {}
    for d in sorted(root.glob("hetero/*_seed-*")):
        if (d / "global").is_dir():
            name = d.name.split("_seed-")[0].removeprefix("name-")
            label = f"fedit, every client at the {name[6:]} rank" if name.startswith("force-") else name
            hetero.setdefault(label, []).append(d)
    if hetero:
        print("\n## Heterogeneous ranks (r2 / r8 / r8 / r50, 25% each)\n")
        anchor = "fedit, every client at the max rank"
        print(table(hetero, base[:1], base_rouge, anchor if anchor in hetero else next(iter(hetero))))


if __name__ == "__main__":
    main()
