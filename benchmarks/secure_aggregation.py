"""Question: what does SecAgg+ (``federation.secure_aggregation``) cost a Flower round, in time and bytes?

The built-in default experiment (FedIT, SmolLM2-135M-Instruct, LoRA r=8 on attention, reasoning-gym tasks, 4
clients a round) on Flower's simulation runtime (``engine: flower-sim``) for ``--rounds`` rounds, plain (the
anchor) and with secure aggregation; each in its own process, one after another on the same machine.
s/round is the mean of the rounds after the first (the first also builds every client's model in its Ray
actor); bytes are the engine's ``bytes_up`` (the payloads, or SecAgg+'s four stages as sent) and
``bytes_down``; the held-out loss is the last round's evaluation, ``precision: fp32`` for both.

    python benchmarks/secure_aggregation.py [--rounds 3] [-o key=value ...]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from children import default_experiment, variant_arguments, variant_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VARIANTS = {"plain": [], "secagg+": ["federation.secure_aggregation=true"]}


def run_one(variant: str, rounds: int, extra: list[str], folder: Path) -> dict:
    """One variant in this process; returns its figures."""
    records, wall, cpu = default_experiment(rounds, ["engine=flower-sim", *VARIANTS[variant], *extra], folder)
    later = records[1:] or records
    return {
        "variant": variant,
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "secagg_bytes_down": sum(
            c.get("secagg_bytes_down", 0) for r in records for c in r.get("clients", [])
        ),
        "eval_loss": records[-1].get("eval_loss"),
        "s_per_round": sum(r["seconds"] for r in later) / len(later),
        "round_seconds": [r["seconds"] for r in records],
        "wall_s": wall,
        "cpu": cpu,
    }


def main() -> None:
    args = variant_arguments(__doc__.splitlines()[0]).parse_args()
    rows = variant_rows(__file__, args, list(VARIANTS), run_one, lambda f: f"{f['s_per_round']:.2f} s/round")
    if rows is None:
        return
    anchor = next((r for r in rows if r["variant"] == "plain"), None)
    cpu = rows[0]["cpu"] if rows else "?"
    print(f"default experiment on flower-sim, {args.rounds} rounds ({cpu})")
    print(
        f"{'variant':8} {'s/round':>8} {'vs plain':>9} {'MB up':>8} {'vs plain':>9} {'MB down':>8} {'held-out loss':>14}"
    )
    for r in rows:
        r["time_ratio"] = r["s_per_round"] / anchor["s_per_round"] if anchor else None
        r["up_ratio"] = r["bytes_up"] / anchor["bytes_up"] if anchor else None
        print(
            f"{r['variant']:8} {r['s_per_round']:8.2f} {r['time_ratio'] or 0:8.2f}x {r['bytes_up'] / 1e6:8.2f} "
            f"{r['up_ratio'] or 0:8.2f}x {(r['bytes_down'] + r['secagg_bytes_down']) / 1e6:8.2f} "
            f"{r['eval_loss']:14.4f}"
        )
    print(json.dumps({"benchmark": "secure_aggregation", "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
