"""Question: how many bytes does each ``federation.wire_dtype`` send, and what does it cost in held-out loss?

The built-in default experiment (FedIT, SmolLM2-135M-Instruct, LoRA r=8 on attention, reasoning-gym tasks, 4
clients a round) for ``--rounds`` rounds with the payloads in fp32 (the anchor), bf16, fp16 and int8, both
ways; each dtype in its own process, one after another on the same machine. Bytes are the engine's
``bytes_up`` / ``bytes_down`` (safetensors bytes of the coded payloads, header included, as they cross
between processes and in Flower's records); the held-out loss is the last round's evaluation on the same
examples for every dtype; ``precision: fp32`` so that the wire is the only difference.

    python benchmarks/wire_dtype.py [--rounds 3] [--dtypes fp32,bf16,fp16,int8] [-o key=value ...]
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from children import default_experiment, variant_arguments, variant_rows

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(dtype: str, rounds: int, extra: list[str], folder: Path) -> dict:
    """One dtype in this process; returns its figures."""
    records, wall, cpu = default_experiment(rounds, [f"federation.wire_dtype={dtype}", *extra], folder)
    return {
        "dtype": dtype,
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "eval_loss": records[-1].get("eval_loss"),
        "train_loss": [r["train_loss"] for r in records],
        "s_per_round": sum(r["seconds"] for r in records[:-1] or records) / len(records[:-1] or records),
        "wall_s": wall,
        "cpu": cpu,
    }


def main() -> None:
    parser = variant_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,int8")
    args = parser.parse_args()
    progress = lambda f: f"held-out loss {f['eval_loss']:.4f}"  # noqa: E731
    rows = variant_rows(__file__, args, args.dtypes.split(","), run_one, progress)
    if rows is None:
        return
    anchor = next((r for r in rows if r["dtype"] == "fp32"), None)
    cpu = rows[0]["cpu"] if rows else "?"
    print(f"default experiment, {args.rounds} rounds, payloads both ways per wire dtype ({cpu})")
    print(
        f"{'wire dtype':10} {'MB up':>9} {'MB down':>9} {'vs fp32':>8} {'held-out loss':>14} {'vs fp32':>9} {'s/round':>8}"
    )
    for r in rows:
        total = r["bytes_up"] + r["bytes_down"]
        r["bytes_ratio"] = total / (anchor["bytes_up"] + anchor["bytes_down"]) if anchor else None
        r["eval_loss_minus_fp32"] = r["eval_loss"] - anchor["eval_loss"] if anchor else None
        print(
            f"{r['dtype']:10} {r['bytes_up'] / 1e6:9.3f} {r['bytes_down'] / 1e6:9.3f} "
            f"{r['bytes_ratio'] or 0:7.3f}x {r['eval_loss']:14.4f} {r['eval_loss_minus_fp32'] or 0:+9.4f} "
            f"{r['s_per_round']:8.2f}"
        )
    print(json.dumps({"benchmark": "wire_dtype", "rounds": args.rounds, "rows": rows}))


if __name__ == "__main__":
    main()
