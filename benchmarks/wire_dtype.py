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

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from children import report, run_self

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_one(dtype: str, rounds: int, extra: list[str], folder: Path) -> dict:
    """One dtype in this process; returns its figures."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fedlora import load_config
    from fedlora.compute import cpu_model_name
    from fedlora.config.loader import builtin_config_path
    from fedlora.runner import run

    overrides = [
        f"federation.rounds={rounds}",
        f"eval.every={rounds}",
        f"federation.wire_dtype={dtype}",
        "compute.precision=fp32",
        "output.plot=false",
        *extra,
    ]
    started = time.perf_counter()
    result = run(load_config(builtin_config_path(), overrides), folder, show_progress=False)
    records = result.records
    return {
        "dtype": dtype,
        "bytes_up": sum(r["bytes_up"] for r in records),
        "bytes_down": sum(r["bytes_down"] for r in records),
        "eval_loss": records[-1].get("eval_loss"),
        "train_loss": [r["train_loss"] for r in records],
        "s_per_round": sum(r["seconds"] for r in records[:-1] or records) / len(records[:-1] or records),
        "wall_s": time.perf_counter() - started,
        "cpu": cpu_model_name(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtypes", default="fp32,bf16,fp16,int8")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra config override")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one dtype, print its JSON
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            report(run_one(args.one, args.rounds, args.override, Path(tmp) / "run"))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        figures = run_self(__file__, dtype, args.rounds, args.override)
        if figures is not None:
            rows.append(figures)
            print(f"  {dtype}: held-out loss {figures['eval_loss']:.4f}", file=sys.stderr, flush=True)
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
