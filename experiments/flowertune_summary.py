"""What experiments/flowertune.sh measured, as FlowerTune's leaderboard reports it: the benchmark accuracies of
the federated adapter and of the base model (each with its standard error, and their difference), and the
communication the way FlowerTune counts it beside fedlora's own byte count.

    python experiments/flowertune_summary.py RUN

FlowerTune's communication cost (its template's ``strategy.py``, ``test_communication_costs``): a round costs
``2 x clients x adapter_bytes / 1024**2`` MB (the adapter's array bytes, sent to each sampled client and back),
and the template warns above 500 MB a round; fedlora's ``bytes_up + bytes_down`` are the serialised payloads
themselves (safetensors bytes, headers included), summed over the rounds. Reads the run's ``metrics.jsonl``, ``config.yaml`` and ``eval/tasks.json``; prints a table and one JSON
line.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

#: the leaderboard's rounds (num-server-rounds in the template)
FLOWERTUNE_ROUNDS = 200


def communication(run: Path) -> dict[str, Any]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rounds = len(records)
    fedlora_bytes = sum(r["bytes_up"] + r["bytes_down"] for r in records)
    adapter_bytes = records[0]["bytes_up"] / records[0]["num_clients"]
    per_round = sum(r["num_clients"] for r in records) / rounds
    flowertune = 2 * rounds * per_round * adapter_bytes
    return {
        "rounds": rounds,
        "clients_per_round": per_round,
        "adapter_mb": adapter_bytes / 1e6,
        "flowertune_mb_per_round": 2 * per_round * adapter_bytes / 1024**2,
        "fedlora_gb": fedlora_bytes / 1e9,
        "flowertune_formula_gb": flowertune / 1e9,
        "full_recipe_gb": 2 * FLOWERTUNE_ROUNDS * per_round * adapter_bytes / 1e9,
        "final_eval_loss": records[-1].get("eval_loss"),
        "first_eval_loss": records[0].get("eval_loss"),
    }


def benchmarks(run: Path) -> list[dict[str, Any]]:
    tasks = json.loads((run / "eval" / "tasks.json").read_text())["tasks"]
    rows = []
    for name, task in tasks.items():
        adapter, base = task["adapter"], task.get("base", {})
        row = {"task": name, "n": task["n"], "num_fewshot": task["num_fewshot"]}
        for metric in ("acc", "acc_norm"):
            if metric not in adapter:
                continue
            row[f"adapter_{metric}"] = adapter[metric]
            row[f"adapter_{metric}_stderr"] = adapter[f"{metric}_stderr"]
            if metric in base:
                row[f"base_{metric}"] = base[metric]
                row[f"base_{metric}_stderr"] = base[f"{metric}_stderr"]
            paired = task.get("adapter_minus_base", {})
            if metric in paired:
                row[f"difference_{metric}"] = paired[metric]
                row[f"difference_{metric}_stderr"] = paired[f"{metric}_stderr"]
        rows.append(row)
    return rows


def main(run: Path) -> None:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    comm = communication(run)
    rows = benchmarks(run) if (run / "eval" / "tasks.json").exists() else []
    print(f"{run}: {cfg['model']['name']}, {comm['rounds']} rounds of {comm['clients_per_round']:g} clients")
    print(f"{'task':<16}{'n':>5}  {'adapter acc':>16}  {'base acc':>16}  {'adapter - base (paired)':>24}")
    for row in rows:
        print(
            f"{row['task']:<16}{row['n']:>5}  {row['adapter_acc']:>9.4f} ± {row['adapter_acc_stderr']:.4f}"
            f"  {row.get('base_acc', math.nan):>9.4f} ± {row.get('base_acc_stderr', math.nan):.4f}"
            f"  {row.get('difference_acc', math.nan):>+15.4f} ± {row.get('difference_acc_stderr', math.nan):.4f}"
        )
    losses = run / "eval" / "eval.json"
    if losses.exists():
        held_out = json.loads(losses.read_text())
        comm["held_out_loss"] = held_out.get("eval_loss")
        comm["base_held_out_loss"] = held_out.get("base_eval_loss")
        print(
            f"held-out loss ({held_out.get('eval_examples')} examples): adapter {comm['held_out_loss']:.4f}, "
            f"base {comm['base_held_out_loss']:.4f}"
        )
    print(
        f"communication: fedlora {comm['fedlora_gb']:.3f} GB, FlowerTune's formula {comm['flowertune_formula_gb']:.3f} GB "
        f"(adapter {comm['adapter_mb']:.2f} MB, {comm['flowertune_mb_per_round']:.1f} MB a round; the template warns "
        f"above 500); the full {FLOWERTUNE_ROUNDS}-round recipe: {comm['full_recipe_gb']:.2f} GB"
    )
    print(
        json.dumps(
            {"experiment": "flowertune_general_nlp", "run": str(run), "communication": comm, "tasks": rows}
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
